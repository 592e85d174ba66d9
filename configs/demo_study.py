"""Search versus random on a demo space whose cells are as wide as the teacher between their layers.

Run (teacher, distill, rate, search, then the study; resumable; its own workdir):
  python -m dna_jax.main --config configs/demo_study.py --workdir /tmp/dna_study
then the ratings' signal beyond FLOPs and depth (no training):
  PYTHONPATH=. python benchmarks/rating_signal.py --ratings study=/tmp/dna_study/ratings \
    --runs /tmp/dna_study/versus_random/runs.csv --max_flops 3000000

configs/demo.py with one change to the space: every layer of a cell is as wide as the teacher's
block (16, 24, 32 channels), where the demo's inner layers are half as wide (8, 12, 16). On the demo
space the ratings prefer the shallowest cells because a deeper cell passes its features through more
half-width layers, and with full-length trainings the search's choice was 9th of 11 random nets of
equal FLOPs (README, "Search versus random"). This space spans 2.45-9.75 MFLOPs at 32x32; the search
budget is 3.0 MFLOPs. The study trains the chosen net and 20 random nets within 3% of its FLOPs, each
with the demo's whole retrain recipe (345 steps, EMA weights), 2 seeds.

Measured (2-core AMD EPYC, with the demo's teacher; test runs shared the cores at times): distill 617 s,
rate 162 s, study 42 runs, median 6.3 min each, 7 h 4 min in sum (5-6.5 min per run on idle cores). The chosen
net 16,8,128|16s2:k5e3/24s2:k5e3-k5e3/32s1:k3e6 (2.99 MFLOPs) 86.82% test top-1 (mean of 2 seeds),
rank 2 of 21 against random nets of 84.79-87.06%: percentile 95 [60, 100] (target: above 90 with the
interval above 50, met by one rank), +0.74 points [+0.34, +1.16] over the random mean, beats a random
net with p 0.85; partial Kendall tau given FLOPs 0.42 [0.08, 0.70] (target: above 0 with its interval,
met), given the number of layers 0.36 [0.02, 0.66]; seed noise 0.26 points, seed-to-seed tau of the nets
0.45. With 10 random nets: percentile 90 [50, 100]; with seed 0 alone: percentile 78 [60, 95], partial
tau 0.26 [-0.07, 0.53] (README, "Search versus random").
`:local` is the demo's smoke run on this space with a 4-net, 1-seed, 30-step study.
"""

import os

import ml_collections

from dna_jax import cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cli.load_config(os.path.join(os.path.dirname(__file__), 'demo.py'), arg)
  config.stages = 'teacher,distill,rate,search,versus_random'
  config.space.blocks = '2 16 1@16,2@16; 2 24 2@24,3@24; 1 32 1@32,2@32'
  config.search.max_flops = 3_000_000
  config.versus_random.update(dict(num_random=20, seeds=2, top_k=1, epochs=0, weights='ema'))
  if arg == 'local':
    config.versus_random.update(dict(num_random=4, seeds=1, epochs=0.13))
  return config
