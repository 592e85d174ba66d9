"""The classifier training step (teacher, retrain, studies) on CPU: its 1x1 and depthwise gradients, now and before.

  PYTHONPATH=. python benchmarks/train_step.py [--net teacher|child] [--steps 10]

`--net teacher` (default): the demo's tiny EfficientNet teacher; `--net child`: the demo's chosen net
(`--arch`), as retrain trains it. Both at the demo's batch (256) and image size (32 px), random images
and labels, `trainer.train_step` under `parallel.data_parallel` exactly as training runs it. Times the
step as the code runs it (1x1 convolutions as one 2-D matmul over the rows, `layers.channels_matmul`;
each depthwise kernel gradient, `layers.tap_sums`, summed a few examples at a time in one reduction
for all k*k taps) and with what came before, one change at a time: Dense's own 4-D contraction; then
also one reduction per tap (`tap_sum_baselines.per_tap`); then also over the whole batch at once. All
in the same process; prints compile seconds, the median step and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from unittest import mock

import jax

from benchmarks import machine_load
from benchmarks import tap_sum_baselines
from configs import demo
from dna_jax import host_memory
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
  print('| 1x1 convolutions; depthwise kernel gradients | compile + first step s | s/step | load |')
  print('|---|---|---|---|')
  before_flat = lambda: mock.patch.object(layers, 'channels_matmul', jax.lax.dot_general)
  whole_batch = lambda: mock.patch.object(layers, 'TAP_SUM_CHUNK_BYTES', 2**62)
  # (short name, what the step does, what is patched in), each change undone on top of the one before.
  variants = [
    ('the code', 'one 2-D matmul; a few examples at a time, all taps in one reduction', ()),
    ('4-D contraction', "Dense's 4-D contraction (before); the same", (before_flat,)),
    (
      'and per tap',
      "Dense's 4-D contraction; one reduction per tap (before that)",
      (before_flat, tap_sum_baselines.per_tap),
    ),
    (
      'and whole batch',
      "Dense's 4-D contraction; one reduction per tap, the whole batch at once",
      (before_flat, tap_sum_baselines.per_tap, whole_batch),
    ),
  ]
  steps = {}
  for short, name, patches in variants:
    with contextlib.ExitStack() as stack:
      for patch in patches:
        stack.enter_context(patch())
      first, steps[short] = time_step(model, tc, batch, args.steps)
    print(f'| {name} | {first:.1f} | {steps[short]:.3f} | {machine_load.load()} |', flush=True)
  print(
    'per step, the code is faster than: '
    + ', '.join(f'{short} {seconds / steps["the code"]:.2f}x' for short, seconds in list(steps.items())[1:])
  )


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  main()
