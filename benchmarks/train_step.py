"""The classifier training step (teacher, retrain, studies) on CPU: depthwise kernel gradients in chunks or not.

  PYTHONPATH=. python benchmarks/train_step.py [--net teacher|child] [--steps 10]

`--net teacher` (default): the demo's tiny EfficientNet teacher; `--net child`: the demo's chosen net
(`--arch`), as retrain trains it. Both at the demo's batch (256) and image size (32 px), random images
and labels, `trainer.train_step` under `parallel.data_parallel` exactly as training runs it. Times the
step with each depthwise kernel gradient (`layers.tap_sums`) summed a few examples at a time in one
reduction for all k*k taps (what the code does), with one reduction per tap (as before:
`tap_sum_baselines.per_tap`), and with one reduction per tap over the whole batch at once (before
that), in the same process; prints compile seconds, the median step and the load average.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from unittest import mock

import jax

from benchmarks import machine_load
from benchmarks import tap_sum_baselines
from configs import demo
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import trainer
from dna_jax.models import child
from dna_jax.models import layers
from dna_jax.stages import teacher as teacher_stage

DEMO_CHOICE = '16,8,128|8s2:k5e3/12s2:k5e3-k7e6/16s1:k5e6'


def model_for(net: str, arch: str):
  config = demo.get_config()
  if net == 'teacher':
    return teacher_stage.teacher_model(config, 10, parallel.AXIS), config.teacher.training
  return child.child_for_training(space_lib.from_string(arch), 10, config, parallel.AXIS), config.retrain


def time_step(model, tc, batch, steps: int) -> tuple[float, float]:
  """(compile + first step seconds, median seconds per step) of a fresh train step."""
  learning_rate_fn = trainer.create_learning_rate_fn(tc, 100)
  state = trainer.create_train_state(
    jax.random.PRNGKey(0), model, batch['image'].shape[-2], trainer.create_optimizer(tc, learning_rate_fn)
  )
  state = parallel.replicate(state, tc.parallel)
  step = parallel.data_parallel(
    functools.partial(
      trainer.train_step, learning_rate_fn=learning_rate_fn, label_smoothing=0.0, ema_decay=tc.ema_decay
    ),
    tc.parallel,
  )
  device_batch = next(trainer.device_batches(iter([batch]), tc.parallel))
  start = time.perf_counter()
  state, metrics = step(state, device_batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--net', choices=('teacher', 'child'), default='teacher')
  parser.add_argument('--arch', default=DEMO_CHOICE, help='the child net (--net child)')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  model, tc = model_for(args.net, args.arch)
  devices = jax.local_device_count()
  keys = jax.random.split(jax.random.key(0))
  batch = {
    'image': jax.random.uniform(keys[0], (devices, args.batch // devices, 32, 32, 3)),
    'label': jax.random.randint(keys[1], (devices, args.batch // devices), 0, 10),
  }
  print(f'{args.net} ({args.arch if args.net == "child" else "tiny EfficientNet"}), batch {args.batch}, 32 px')
  print('| kernel gradients | compile + first step s | s/step | load |')
  print('|---|---|---|---|')
  one_pass = time_step(model, tc, batch, args.steps)
  print(
    f'| a few examples at a time, all taps in one reduction | {one_pass[0]:.1f} | {one_pass[1]:.3f} '
    f'| {machine_load.load()} |',
    flush=True,
  )
  with tap_sum_baselines.per_tap():
    per_tap = time_step(model, tc, batch, args.steps)
  print(
    f'| a few examples at a time, one reduction per tap | {per_tap[0]:.1f} | {per_tap[1]:.3f} '
    f'| {machine_load.load()} |',
    flush=True,
  )
  with tap_sum_baselines.per_tap(), mock.patch.object(layers, 'TAP_SUM_CHUNK_BYTES', 2**62):
    whole = time_step(model, tc, batch, args.steps)
  print(f'| the whole batch at once, one reduction per tap | {whole[0]:.1f} | {whole[1]:.3f} | {machine_load.load()} |')
  print(
    f'per step: {per_tap[1] / one_pass[1]:.2f}x against one reduction per tap, '
    f'{whole[1] / one_pass[1]:.2f}x against the whole batch at once'
  )


if __name__ == '__main__':
  main()
