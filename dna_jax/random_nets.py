"""Random architectures of a rated space (NumPy): uniform draws, and draws of equal cost.

An architecture is given by its rows: one row index per block into `Ratings.blocks[k]`, the row
that holds its cell, path and input width (so its summed score and costs are sums over rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib


def _row_tables(ratings: ratings_lib.Ratings) -> list[np.ndarray]:
  """Per block: table[offset of cell + path index, input width index] = row of the block's ratings."""
  tables = []
  for k, (block, rated) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    widths = space_lib.block_input_widths(ratings.space, k)
    offsets = np.cumsum([0] + [cell.num_paths for cell in block.cells])[:-1]
    table = np.full((block.num_paths, len(widths)), -1, np.int64)
    table[offsets[rated.cell] + rated.path, np.searchsorted(widths, rated.in_channels)] = np.arange(len(rated))
    tables.append(table)
  return tables


def sample_architectures(
  ratings: ratings_lib.Ratings, count: int, rng: np.random.Generator, cells: Sequence[int] | None = None
) -> np.ndarray:
  """Rows [count, blocks] of architectures drawn uniformly from the space (with replacement); with
  `cells` (a cell index per block), uniformly from the architectures made of those cells."""
  space = ratings.space
  rows = np.zeros((count, len(space.blocks)), np.int64)
  width = np.full(count, space.ds_width)
  for k, (block, rated, table) in enumerate(zip(space.blocks, ratings.blocks, _row_tables(ratings))):
    widths = space_lib.block_input_widths(space, k)
    if cells is None:
      paths = rng.integers(0, block.num_paths, count)
    else:
      first = sum(cell.num_paths for cell in block.cells[: cells[k]])
      paths = first + rng.integers(0, block.cells[cells[k]].num_paths, count)
    rows[:, k] = table[paths, np.searchsorted(widths, width)]
    width = np.array([cell.width for cell in block.cells])[rated.cell[rows[:, k]]]
  return rows


def totals(ratings: ratings_lib.Ratings, rows: np.ndarray, field: str) -> np.ndarray:
  """Per architecture: the summed block `score`, or the total `flops` / `params` / `macs` (fixed part included)."""
  total = np.zeros(len(rows)) if field == 'score' else np.full(len(rows), getattr(ratings, f'fixed_{field}'), np.int64)
  for k, rated in enumerate(ratings.blocks):
    total = total + getattr(rated, field)[rows[:, k]]
  return total


def summed_scores(ratings: ratings_lib.Ratings, rows: np.ndarray) -> np.ndarray:
  """Summed block score of each architecture given by its rows (block order, as `architecture_rating`)."""
  return totals(ratings, rows, 'score')


def architecture(ratings: ratings_lib.Ratings, rows: Sequence[int]) -> space_lib.Architecture:
  """The architecture whose block rows are `rows`."""
  choices = [(int(b.cell[r]), b.ops[r]) for b, r in zip(ratings.blocks, rows)]
  return space_lib.make_architecture(ratings.space, choices)


def equal_cost(
  ratings: ratings_lib.Ratings,
  flops: int,
  tolerance: float,
  count: int,
  rng: np.random.Generator,
  exclude: Sequence[Sequence[int]] = (),
  draws: int = 200_000,
  cells: Sequence[int] | None = None,
) -> np.ndarray:
  """Rows of `count` distinct architectures drawn uniformly from those whose FLOPs lie within
  `flops` x (1 +- tolerance), none of `exclude`; with `cells`, only architectures made of those cells
  (a cell index per block: the same depth and widths, other ops); reproducible from `rng`.

  Uniform draws from the space kept when in the band (rejection sampling), in batches of `draws`, at
  most 50 batches; a clear error when the band holds too few nets.
  """
  low, high = flops * (1 - tolerance), flops * (1 + tolerance)
  excluded = {tuple(int(r) for r in rows) for rows in exclude}
  found: dict[tuple[int, ...], None] = {}
  for _ in range(50):
    rows = sample_architectures(ratings, draws, rng, cells)
    cost = totals(ratings, rows, 'flops')
    for candidate in rows[(cost >= low) & (cost <= high)]:
      key = tuple(int(r) for r in candidate)
      if key not in excluded:
        found.setdefault(key)
      if len(found) == count:
        return np.array(list(found), np.int64)
  where = 'the space' if cells is None else f'the architectures of cells {tuple(cells)}'
  raise ValueError(
    f'only {len(found)} distinct architectures with FLOPs within {100 * tolerance:g}% of {flops:,} were found in '
    f'{50 * draws:,} uniform draws from {where}; widen the tolerance or ask for fewer random nets'
  )
