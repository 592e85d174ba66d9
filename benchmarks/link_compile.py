"""Where a per-layer distillation program's compile time goes: XLA:CPU options and the depthwise conv.

  PYTHONPATH=. python benchmarks/link_compile.py [--block 3] [--layer 1] [--batch 8] [--repeats 5]

Part 1: the forward and the backward program of one layer of the ImageNet space
(`link_programs.switch_forward_program` / `switch_backward_program`, the programs `distill.programs='layer'`
compiles once per layer shape; default: the second layer of the deepest cell of block 3), lowered
once and compiled under each XLA:CPU option set of OPTIONS: compile seconds and the median run time.

Part 2: one candidate op alone (its forward and gradient, jit), k3/k5/k7 at expansion 6 on the same
layer's input, with the depthwise convolution as XLA's grouped convolution ('native') and as the
shift-and-add used on CPU ('auto'): compile seconds, run time and the size of the lowered program.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from benchmarks import machine_load
from dna_jax import host_memory
from dna_jax import link_programs
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax.models import layers
from dna_jax.models import supernet

OPTIONS = {
  'default': {},
  'LLVM opt level 1': {'xla_backend_optimization_level': 1},
  'LLVM opt level 0': {'xla_backend_optimization_level': 0},
  'no expensive LLVM passes': {'xla_llvm_disable_expensive_passes': True},
  'codegen split 4': {'xla_cpu_parallel_codegen_split_count': 4},
  'XNNPACK': {'xla_cpu_use_xnnpack': True},
  'no fusion emitters': {'xla_cpu_use_fusion_emitters': False},
}


def timed_runs(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--block', type=int, default=3, help='block number (1-based) of the ImageNet space')
  parser.add_argument('--layer', type=int, default=1, help='layer index in the deepest cell of the block')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)

  space = space_lib.default_imagenet_space()
  k = args.block - 1
  cell = supernet.supernet_cells(space)[k][-1]
  size = space_lib.supernet_input_sizes(space, 224, 2)[k]
  if k == 0 or not 0 <= args.layer < cell.cell.layers:
    raise SystemExit(f'--block must be 2..{len(space.blocks)} and --layer in 0..{cell.cell.layers - 1}')
  shape = (args.batch, size, size, cell.in_channels)
  for _, modules, _ in cell.units()[: args.layer + 1]:
    keys = tuple(jax.random.split(jax.random.key(0), len(modules)))
    in_shape, (variables, shape) = shape, supernet.init_link(modules, keys, shape)
  shape, out_shape = in_shape, shape
  mesh = parallel.make_mesh()
  sharded = lambda x: jax.device_put(x, NamedSharding(mesh, P(parallel.AXIS)))
  replicated = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  params = replicated({op: v['params'] for op, v in zip(space_lib.OP_NAMES, variables)})
  stats = replicated({op: v['batch_stats'] for op, v in zip(space_lib.OP_NAMES, variables)})
  x = sharded(rng.normal(size=shape).astype(np.float32))
  dy = sharded(rng.normal(size=out_shape).astype(np.float32))
  op = sharded(np.array([space_lib.NUM_OPS - 1], np.int32))  # k7e6, the costliest
  print(
    f'jax {jax.__version__}; ImageNet block {args.block}, layer {args.layer} of a {cell.cell.layers}-layer cell: '
    f'{shape} -> {out_shape}; load {machine_load.load()}',
    flush=True,
  )

  print('\n| program | XLA:CPU options | compile s | run ms (k7e6) | load |\n|---|---|---|---|---|')
  programs = (
    ('layer forward', link_programs.switch_forward_program(modules, 'shard_map'), (params, stats, x, op)),
    ('layer backward', link_programs.switch_backward_program(modules, True, 'shard_map'), (params, stats, x, op, dy)),
  )
  for what, program, program_args in programs:
    lowered = program.lower(*program_args)
    for name, options in OPTIONS.items():
      start = time.perf_counter()
      try:
        compiled = lowered.compile(compiler_options=options)
      except jax.errors.JaxRuntimeError as e:  # an option this XLA build does not know
        print(f'| {what} | {name} | not accepted: {str(e).splitlines()[0][:80]} | | |')
        continue
      seconds = time.perf_counter() - start
      run = timed_runs(compiled, program_args, args.repeats)
      print(f'| {what} | {name} | {seconds:.2f} | {1e3 * run:.1f} | {machine_load.load()} |', flush=True)

  print('\n| one op, forward + gradient | depthwise conv | compile s | run ms | lowered lines |\n|---|---|---|---|---|')
  x_local = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  for kernel in (3, 5, 7):
    for depthwise in ('native', 'auto'):
      conventions = dataclasses.replace(layers.KERAS, depthwise=depthwise)
      module = layers.MBConv(out_shape[-1], 6, kernel, cell.layer_shape(args.layer)[2], conventions=conventions)
      op_variables = jax.jit(module.init)(jax.random.key(1), x_local)

      def loss(p, x, module=module, op_variables=op_variables):
        y, _ = supernet.apply_module(module, p, op_variables['batch_stats'], x, True)
        return jnp.sum(y * y)

      grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
      lowered = grad.lower(op_variables['params'], x_local)
      start = time.perf_counter()
      compiled = lowered.compile()
      seconds = time.perf_counter() - start
      run = timed_runs(compiled, (op_variables['params'], x_local), args.repeats)
      lines = lowered.as_text().count('\n')
      print(f'| k{kernel}e6 | {depthwise} | {seconds:.2f} | {1e3 * run:.1f} | {lines} |', flush=True)
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
