"""The demo with a deeper teacher: is the teacher's depth why the demo's ratings prefer shallow cells?

Run (every stage of the demo, in its own workdir: the teacher differs):
  python -m dna_jax.main --config configs/demo_deep_teacher.py --workdir /tmp/dna_demo_deep
then compare its ratings with the demo's (no training):
  PYTHONPATH=. python benchmarks/rating_signal.py --ratings demo=/tmp/dna_demo/ratings \
    --ratings deep_teacher=/tmp/dna_demo_deep/ratings

Everything is configs/demo.py except the teacher: 'tiny_deep' has the tiny teacher's widths with
3, 3 and 2 layers in its DNA blocks instead of 2, 2 and 1, at least as deep as the space's deepest
cell in every block. `--config.stages=versus_random` then runs the study of search against random
nets of equal FLOPs with the demo's full retrain recipe (1 seed, 10 random nets).

Measured (2-core AMD EPYC, a day on which the demo's own teacher trained at 0.4-0.5 steps/s instead of
the 1.5 of the README's demo run; teacher, distill, rate and search in 26 min): teacher 87.32% test top-1
(the demo's 86.94%). Best path of the shallow / deep cell, block 1: 0.421 / 0.455, block 2: 0.484 /
0.509, block 3: 0.372 / 0.455 (the demo's, same day: 0.377 / 0.425, 0.476 / 0.507, 0.360 / 0.467).
The shallower cell still wins every block (the gaps shrink by 19-29%), path scores rank with Kendall
tau 0.78 against the demo's, and the search chooses the demo's net,
16,8,128|8s2:k5e3/12s2:k5e3-k7e6/16s1:k5e6: a teacher block shallower than the student cell is not
the cause (the half-width layers inside the deeper cells are much of it: README, "Search versus random").
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
