"""Ranking fidelity of the demo: do its ratings rank nets the way their trained accuracy does?

Run after the demo (configs/demo.py) in the same workdir, which then holds its ratings and search:
  python -m dna_jax.main --config configs/demo_fidelity.py --workdir /tmp/dna_demo
(same as `--config configs/demo.py --config.stages=fidelity`). It picks 10 nets of the demo space
spread over the range of summed block scores (the search's choice and the lowest-scoring net
included), trains each from scratch for 1 epoch with the demo's retrain recipe, 2 of them again
with a second seed, and writes WORKDIR/fidelity/{fidelity.csv,fidelity.json,fidelity.png}: Kendall
tau and Spearman rho of the ratings against test top-1 (bootstrap 95% intervals), beside FLOPs and
params as proxies. Killed runs resume where they stopped; finished nets are never retrained.
Expected (measured on 2 idle CPU cores after the demo: 12 runs, 43 min 37 s): Kendall tau 0.24
[-0.40, 0.79] for the ratings, 0.51 [0.05, 0.86] for FLOPs, 0.38 for params; accuracies 81.0-84.8%;
the two second-seed runs moved by 0.52 and 1.33 points.
`:local` trains 6 nets for half an epoch each (a smoke run).
"""

import os

import ml_collections

from dna_jax import cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'local'):
    raise ValueError(f'unknown config argument {arg!r}; valid: local')
  config = cli.load_config(os.path.join(os.path.dirname(__file__), 'demo.py'), None)
  config.stages = 'fidelity'
  config.fidelity.num_archs = 10
  config.fidelity.noise_archs = 2
  config.fidelity.epochs = 1
  if arg == 'local':
    config.fidelity.num_archs = 6
    config.fidelity.noise_archs = 1
    config.fidelity.epochs = 0.5
  return config
