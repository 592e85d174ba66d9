"""Initialising the supernet: one program per cell against one shared program per link shape.

  PYTHONPATH=. python benchmarks/supernet_init.py [--space imagenet|small] [--blocks 3,4,5] [--threads 2]
      [--skip_per_cell]

For the selected blocks (default: all), initialises every cell's variables these ways, in this
order, in one process:
- one program per cell: `run_once.jit(cell.init)` (the link programs inline into it; how
  `supernet_store.create_block_state` initialised a block before);
- one program per link shape: `cell.init` called as `create_block_state` now does, where every link
  (stem, DS, layer) with the same modules and input shape shares one compiled program;
- the same with those programs first compiled by --threads threads at once
  (`supernet.compile_link_inits`, as the distill stage does with distill.compile_threads);
- every block's Adam state: `optimizer.init` run eagerly (a small program per parameter shape) and
  as one program per block (`run_once.jit`, as `create_block_state` does);
- the abstract target of a resumed block (`supernet_store.abstract_block_state`, jax.eval_shape:
  nothing compiled or run).
Reports wall seconds, programs compiled (from JAX's compile log) and whether the initialisations
give bit-identical variables. --skip_per_cell skips the first (slowest) way.

--space imagenet: `space.default_imagenet_space()` (15 cells, 224 px, stem stride 2). --space small:
the demo space at 32 px (stem stride 1).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from benchmarks import distill_programs
from benchmarks import distill_step as step_benchmark
from benchmarks import machine_load
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import run_once
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax.models import supernet


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--space', choices=('imagenet', 'small'), default='imagenet')
  parser.add_argument('--blocks', default='', help="only these blocks, e.g. '3' or '3,4,5' (default: all)")
  parser.add_argument('--threads', type=int, default=2, help='threads compiling the link programs ahead')
  parser.add_argument('--skip_per_cell', action='store_true', help='skip the one-program-per-cell way')
  args = parser.parse_args(argv)
  counter = distill_programs.count_compiles()

  space, _, _, image, stem_stride = step_benchmark.benchmark_space(args.space)
  cells = supernet.supernet_cells(space, stem_stride=stem_stride)
  sizes = space_lib.supernet_input_sizes(space, image, stem_stride)
  block_ids = space_lib.parse_block_numbers(args.blocks, len(cells), '--blocks')
  num_cells = sum(len(cells[k]) for k in block_ids)
  links = sum(len(cell.units()) for k in block_ids for cell in cells[k])
  print(
    f'jax {jax.__version__}; space {args.space}: blocks {[k + 1 for k in block_ids]}, {num_cells} cells, '
    f'{links} links; load {machine_load.load()}',
    flush=True,
  )

  def initialise(per_cell_program: bool, threads: int = 0) -> tuple[dict, float, int]:
    supernet._init_program.cache_clear()  # nothing traced before either way
    before, start = counter.count, time.perf_counter()
    if threads:
      pairs = [(cell, sizes[k]) for k in block_ids for cell in cells[k]]
      supernet.compile_link_inits(pairs, jax.random.key(0), threads)
    variables = {}
    for k in block_ids:
      for c, cell in enumerate(cells[k]):
        init = run_once.jit(cell.init) if per_cell_program else cell.init
        variables[(k, c)] = init(jax.random.fold_in(jax.random.key(k), c), supernet.zeros_like_input(cell, 1, sizes[k]))
    jax.block_until_ready(variables)
    return variables, time.perf_counter() - start, counter.count - before

  def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

  rows = []
  per_cell = None
  if not args.skip_per_cell:
    per_cell, seconds, compiled = initialise(per_cell_program=True)
    rows.append(('one program per cell, `run_once.jit(cell.init)`', seconds, compiled, machine_load.load()))
  per_link, seconds, compiled = initialise(per_cell_program=False)
  rows.append(('one program per link shape, `cell.init`', seconds, compiled, machine_load.load()))
  threaded, seconds, compiled = initialise(per_cell_program=False, threads=args.threads)
  rows.append(
    (
      f'the same, compiled ahead by {args.threads} threads (`compile_link_inits`)',
      seconds,
      compiled,
      machine_load.load(),
    )
  )
  identical = same(per_link, threaded) and (per_cell is None or same(per_cell, per_link))

  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
  params = {k: {f'cell{c}': per_link[(k, c)]['params'] for c in range(len(cells[k]))} for k in block_ids}
  adam = {}
  for what, init in (('eager', optimizer.init), ('jitted', run_once.jit(optimizer.init))):
    before, start = counter.count, time.perf_counter()
    adam[what] = jax.block_until_ready([init(params[k]) for k in block_ids])
    label = '`optimizer.init`, eager' if what == 'eager' else '`run_once.jit(optimizer.init)`, one program per block'
    rows.append(
      (f'Adam state of every block, {label}', time.perf_counter() - start, counter.count - before, machine_load.load())
    )
  identical = identical and same(adam['eager'], adam['jitted'])

  before, start = counter.count, time.perf_counter()
  for k in block_ids:
    supernet_store.abstract_block_state(tuple(cells[k]), sizes[k], optimizer)
  rows.append(
    (
      'abstract restore target, `abstract_block_state`',
      time.perf_counter() - start,
      counter.count - before,
      machine_load.load(),
    )
  )

  print('\n| initialisation | s | programs compiled | load 1/5/15 min |\n|---|---|---|---|')
  for what, seconds, compiled, at_load in rows:
    print(f'| {what} | {seconds:.1f} | {compiled} | {at_load} |')
  if per_cell is not None:
    print(f'\nper cell / per link shape: {rows[0][1] / rows[1][1]:.2f}x (same run)')
  per_link_s, ahead_s, eager_s, jitted_s = (seconds for _, seconds, _, _ in rows[-5:-1])
  print(f'per link shape / compiled ahead: {per_link_s / ahead_s:.2f}x; Adam eager / jitted: {eager_s / jitted_s:.2f}x')
  print(f'variables bit-identical: {identical}')
  return 0 if identical else 1


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
