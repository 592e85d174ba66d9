"""A link's optimizer update as one program (as the per-layer step runs it) against one program per leaf shape.

  PYTHONPATH=. python benchmarks/link_update.py [--repeats 7]

The per-layer distillation step (`distill.programs='layer'`) updates each link with one program per link
shape (`link_programs.update_program`): in the 15-cell ImageNet step's first step these 23 programs took
29-45 s of XLA compile (README, Performance). This script counts the leaves and leaf shapes of the whole
ImageNet supernet, then takes its link with the most leaves and measures, in one run, the compile seconds
and median update time (after a warm-up call) (a) of its one update program and (b) of the same update (`_link_update` with the
blocks' optimizer) compiled once per distinct (leaf shape, leaf name) and called once per leaf. Both
update the same numbers (checked).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from benchmarks import machine_load
from benchmarks.link_compile import timed_runs
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import link_programs
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax.models import supernet


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)
  space = space_lib.default_imagenet_space()
  cells = supernet.supernet_cells(space)
  sizes = space_lib.supernet_input_sizes(space, 224, 2)
  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
  links, leaves, shapes = {}, 0, set()
  for k, block in enumerate(cells):
    state = supernet_store.abstract_block_state(tuple(block), sizes[k], optimizer)
    for cell_params in state.params.values():
      for link_params in cell_params.values():
        flat = jax.tree_util.tree_flatten_with_path(link_params)[0]
        leaves += len(flat)
        shapes.update((leaf.shape, path[-1].key) for path, leaf in flat)
        links.setdefault(tuple((path, leaf.shape) for path, leaf in flat), link_params)
  print(
    f'ImageNet supernet: {leaves} parameter leaves in {len(shapes)} (shape, name) pairs; '
    f'{len(links)} link shapes; load {machine_load.load()}',
    flush=True,
  )

  abstract = links[max(links, key=len)]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  opt_state = optimizer.init(params)
  update = jax.jit(lambda p, s, g: link_programs._link_update(optimizer, p, s, g))

  start = time.perf_counter()
  compiled = update.lower(params, opt_state, grads).compile()
  one_compile = time.perf_counter() - start
  one_run = timed_runs(compiled, (params, opt_state, grads), args.repeats)
  whole = compiled(params, opt_state, grads)

  # The same update leaf by leaf: each leaf as a one-leaf tree under its own name (the weight-decay
  # mask reads it), with the optimizer state's matching part.
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  per_leaf = []  # (program key, params, optimizer state, gradient) per leaf
  for (path, p), g in zip(flat_params, jax.tree.leaves(grads)):
    name = path[-1].key
    per_leaf.append(((name, p.shape), {name: p}, optimizer.init({name: p}), {name: g}))
  start = time.perf_counter()
  programs = {}
  for key, tree, state, grad in per_leaf:
    if key not in programs:
      programs[key] = update.lower(tree, state, grad).compile()
  leaf_compile = time.perf_counter() - start
  run_leaves = lambda: [programs[key](tree, state, grad) for key, tree, state, grad in per_leaf]
  leaf_run = timed_runs(run_leaves, (), args.repeats)
  expected = jax.tree.leaves(whole[0])
  for want, (new_params, _, _) in zip(expected, run_leaves()):
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(new_params)[0]), np.asarray(want), rtol=1e-6, atol=1e-7)

  print(f'\nthe link with the most leaves: {len(flat_params)} leaves, {len(programs)} (shape, name) pairs')
  print('\n| update | programs | compile s | update ms (median) | load |\n|---|---|---|---|---|')
  print(f'| one program for the link | 1 | {one_compile:.2f} | {1e3 * one_run:.2f} | {machine_load.load()} |')
  print(
    f'| one program per leaf shape | {len(programs)} | {leaf_compile:.2f} | {1e3 * leaf_run:.2f} | '
    f'{machine_load.load()} |'
  )
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
