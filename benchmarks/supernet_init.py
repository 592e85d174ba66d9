"""Initialising the supernet: one program per cell against one shared program per link shape.

  PYTHONPATH=. python benchmarks/supernet_init.py [--space imagenet|small] [--blocks 3,4,5]

For the selected blocks (default: all), initialises every cell's variables three ways, in this
order, in one process:
- one program per cell: `jax.jit(cell.init)` (the link programs inline into it; how
  `supernet_store.create_block_state` initialised a block before);
- one program per link shape: `cell.init` called as `create_block_state` now does, where every link
  (stem, DS, layer) with the same modules and input shape shares one compiled program;
- the abstract target of a resumed block (`supernet_store.abstract_block_state`, jax.eval_shape:
  nothing compiled or run).
Reports wall seconds, programs compiled (from JAX's compile log) and whether the two initialisations
give bit-identical variables.

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
from benchmarks import machine_load
from dna_jax import distill_steps
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax.models import supernet


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--space', choices=('imagenet', 'small'), default='imagenet')
  parser.add_argument('--blocks', default='', help="only these blocks, e.g. '3' or '3,4,5' (default: all)")
  args = parser.parse_args(argv)
  counter = distill_programs.count_compiles()

  if args.space == 'imagenet':
    space, image, stem_stride = space_lib.default_imagenet_space(), 224, 2
  else:
    space, image, stem_stride = space_lib.parse_space(distill_programs.SMALL_SPACE, 16, 8), 32, 1
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

  def initialise(per_cell_program: bool) -> tuple[dict, float, int]:
    supernet._init_program.cache_clear()  # nothing traced before either way
    before, start = counter.count, time.perf_counter()
    variables = {}
    for k in block_ids:
      for c, cell in enumerate(cells[k]):
        init = jax.jit(cell.init) if per_cell_program else cell.init
        variables[(k, c)] = init(jax.random.fold_in(jax.random.key(k), c), supernet.zeros_like_input(cell, 1, sizes[k]))
    jax.block_until_ready(variables)
    return variables, time.perf_counter() - start, counter.count - before

  rows = []
  per_cell, seconds, compiled = initialise(per_cell_program=True)
  rows.append(('one program per cell, `jax.jit(cell.init)`', seconds, compiled, machine_load.load()))
  per_link, seconds, compiled = initialise(per_cell_program=False)
  rows.append(('one program per link shape, `cell.init`', seconds, compiled, machine_load.load()))
  identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(per_cell), jax.tree.leaves(per_link)))

  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
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
  print(f'\nper cell / per link shape: {rows[0][1] / rows[1][1]:.2f}x (same run); variables bit-identical: {identical}')
  return 0 if identical else 1


if __name__ == '__main__':
  sys.exit(main())
