"""Search versus random on the demo: does the demo's chosen net beat random nets of the same FLOPs?

Run after the demo (configs/demo.py) in the same workdir, which then holds its ratings and search:
  python -m dna_jax.main --config configs/demo_versus_random.py --workdir /tmp/dna_demo
(same as `--config configs/demo.py --config.stages=versus_random` with the sizes below). It trains the
search's chosen net and 10 random nets of the demo space whose FLOPs lie within 3% of it, each with 2
seeds for a quarter of an epoch (58 steps at batch 256) with the demo's retrain recipe shortened
(warm-up and EMA scaled to the run, studies.recipe), and writes
WORKDIR/versus_random/{runs.csv,summary.json,versus_random.png}: the chosen net's percentile among the
random nets with a bootstrap interval, the probability that it beats a random equal-cost net, and the
partial Kendall tau of ratings and accuracy given FLOPs. Killed runs resume; finished ones are kept.
The study's defaults (config_base: 3 seeds, the top 3 nets, the retrain recipe's full length) cost
about 10x more; these sizes are what 2 CPU cores can afford.
Measured (2-core AMD EPYC, 22 runs in 48 min): the chosen net 71.3% top-1 (final weights, mean of 2
seeds), rank 1 of 11 (random nets' means 60.2-70.2%), percentile 100 [70, 100], beats a random net with
probability 0.93; partial Kendall tau given FLOPs 0.49 [-0.10, 0.92]; seed noise 2.4 points. At 58 steps
shallow nets train fastest: fewer layers alone ranks the 11 nets with Kendall tau 0.73, and the ratings'
partial tau given the number of layers is 0.10 [-0.43, 0.77] (benchmarks/rating_signal.py). With
`--config.versus_random.same_cells=True --config.versus_random.seeds=1` (random nets of the chosen net's
own cells, 11 runs, 37 min): rank 6 of 11, percentile 50 [20, 80]. With the full retrain recipe
(`--config.versus_random.epochs=0 --config.versus_random.seeds=1 --config.versus_random.weights=ema`,
11 runs of 345 steps, 32 min): the chosen net 83.53% is rank 9 of 11 (random nets 82.2-85.2%),
percentile 20 [0, 50], partial tau given FLOPs -0.09 [-0.59, 0.45]. README, "Search versus random".
`:local` trains 4 random nets, 1 seed each, for 30 steps (a smoke run).
"""

import os

import ml_collections

from dna_jax import cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'local'):
    raise ValueError(f'unknown config argument {arg!r}; valid: local')
  config = cli.load_config(os.path.join(os.path.dirname(__file__), 'demo.py'), None)
  config.stages = 'versus_random'
  config.versus_random.num_random = 10
  config.versus_random.seeds = 2
  config.versus_random.top_k = 1
  config.versus_random.epochs = 0.25
  # A 58-step run ends at learning rate 0 (cosine); its EMA (warmed up, studies.recipe) still mixes in
  # weights and BatchNorm statistics from the high-rate steps: scored by the final weights.
  config.versus_random.weights = 'raw'
  if arg == 'local':
    config.versus_random.num_random = 4
    config.versus_random.seeds = 1
    config.versus_random.epochs = 0.13
  return config
