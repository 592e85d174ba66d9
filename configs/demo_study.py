"""The demo with a deeper teacher: does a teacher as deep as the space's deepest cells give ratings signal?

Run (every stage of the demo, in its own workdir: the teacher differs):
  python -m dna_jax.main --config configs/demo_study.py --workdir /tmp/dna_demo_study
then the study of the search against random nets of equal FLOPs, with the demo's full retrain recipe:
  python -m dna_jax.main --config configs/demo_study.py --workdir /tmp/dna_demo_study \
    --config.stages=versus_random

Everything is configs/demo.py except the teacher: 'tiny_deep' has the tiny teacher's widths with
3, 3 and 2 layers in its DNA blocks instead of 2, 2 and 1, at least as deep as the space's deepest
cell in every block.
`:local` is the demo's smoke run with this teacher.
"""

import os

import ml_collections

from dna_jax import cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cli.load_config(os.path.join(os.path.dirname(__file__), 'demo.py'), arg)
  config.teacher.variant = 'tiny_deep'
  config.versus_random.update(dict(num_random=10, seeds=1, top_k=1, epochs=0, weights='ema'))
  return config
