"""Tracing and lowering the one-program distillation step, in a fresh process (JAX's caches cold).

  PYTHONPATH=. python benchmarks/step_tracing.py [--space small|imagenet] [--autodiff_baseline]

Traces and lowers (never compiles) `distill_steps.distill_step` over every cell of the space, as
`benchmarks/distill_step.py` builds it (demo space and tiny teacher at batch 128 and 32 px, or the
ImageNet space and B7 at batch 8 and 224 px; random variables), and prints the seconds of each and
the size of the lowered program. --autodiff_baseline traces the step as before
`supernet.recomputing_switch`: JAX differentiates each layer's `lax.switch` over its rematerialised
ops, each op traced at every layer. Run the two ways alternately, each in its own process: in one
process the second trace finds JAX's own caches warm.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from unittest import mock

import jax
import numpy as np

from benchmarks import distill_step as step_benchmark
from benchmarks import machine_load
from benchmarks import random_variables
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax.models import supernet


def autodiff_switch(modules, params, stats, op, x):
  """A layer as `SupernetCell.apply` ran it before `supernet.recomputing_switch`."""
  names = space_lib.OP_NAMES
  apply_op = lambda j, x: supernet.apply_candidate_op(modules[j], params[names[j]], stats[names[j]], x, True, 'op')
  return supernet.switch_ops(apply_op, stats, op, x)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--space', choices=('small', 'imagenet'), default='small')
  parser.add_argument('--autodiff_baseline', action='store_true')
  args = parser.parse_args(argv)
  space, teacher_name, batch, image, stem_stride = step_benchmark.benchmark_space(args.space)
  setup_args = argparse.Namespace(space=args.space, dtype='float32', remat='op')
  _, model, cells, _, _ = step_benchmark.setup(setup_args)
  sizes = space_lib.supernet_input_sizes(space, image, stem_stride)
  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
  names = [f'block{k + 1}' for k in range(len(space.blocks))]
  # Abstract states: tracing reads only shapes.
  states = {
    name: jax.eval_shape(
      lambda k=k: supernet_store.create_block_state(jax.random.key(k), tuple(cells[k]), sizes[k], optimizer)
    )
    for k, name in enumerate(names)
  }
  images = np.zeros((1, batch, image, image, 3), np.float32)
  step = functools.partial(
    distill_steps.distill_step,
    blocks=tuple((k, tuple(cells[k])) for k in range(len(names))),
    teacher_apply=functools.partial(teacher_lib.teacher_features, model, up_to=len(names), train_mode_bn=False),
    optimizers=dict.fromkeys(names, optimizer),
    sampling='uniform',
    seed=0,
  )
  fn = parallel.data_parallel(step, 'shard_map', num_broadcast=1)
  batch_in = parallel.shard_batch({'image': images}, 'shard_map')
  teacher_variables = random_variables.teacher_variables(model)
  if args.autodiff_baseline:
    way = 'switch differentiated by JAX over rematerialised ops'
    patch = mock.patch.object(supernet, 'recomputing_switch', autodiff_switch)
  else:
    way, patch = 'switch with its own gradient, ops jitted', contextlib.nullcontext()
  with patch:
    start = time.perf_counter()
    traced = fn.trace(states, batch_in, teacher_variables)
    trace_s = time.perf_counter() - start
    lowered = traced.lower()
    lower_s = time.perf_counter() - start - trace_s
  text = lowered.as_text()
  print(
    f'{args.space} space ({teacher_name} teacher, batch {batch}, {image} px), {way}: tracing {trace_s:.1f} s, '
    f'lowering {lower_s:.1f} s, {len(text) / 1e6:.1f} MB of StableHLO; load {machine_load.load()}'
  )
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
