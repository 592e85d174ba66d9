"""Adaptive rating's pruning rule: which paths of a block can be in no answer of the search.

A path p is *dominated* by a path q of the same block and output width when q costs no more than p in
every cost (FLOPs and params, and with a latency table its predicted latency, at every input width the
block can receive) and q's error is clearly lower: over G groups of the same rating images, the paired
differences d_g = e_p,g - e_q,g have mean - z * standard error > 0. Swapping p for any of its dominators in a net keeps every budget and
lowers the summed (or per-block normalised, or multiplied) score, so a path with at least k
dominators is in none of the k best nets under any budget on those costs, nor on a Pareto front. The
rate stage scores every path on a first slice of the rating images, stops rating the dominated ones
and finishes the rest on the whole split.
"""

from __future__ import annotations

import numpy as np

from dna_jax import costs as costs_lib
from dna_jax import latency_table as latency_lib
from dna_jax import space as space_lib


def block_path_costs(
  space: space_lib.SearchSpace,
  block_index: int,
  resolution: int,
  stem_stride: int,
  latency: latency_lib.LatencyTable | None = None,
) -> list[np.ndarray]:
  """Per cell of block `block_index`, an int64 array (paths, costs x input widths): FLOPs and params at each
  width, and with a latency table the predicted nanoseconds at each width."""
  block = space.blocks[block_index]
  size = space_lib.block_sizes(space, resolution, stem_stride)[block_index]
  head = space.head_width if block_index == len(space.blocks) - 1 else None
  widths = space_lib.block_input_widths(space, block_index)
  out = []
  for cell in block.cells:
    rows = []
    for ops in cell.paths():
      each = [costs_lib.cell_cost(cell, ops, w, size, head) for w in widths]
      row = [c.flops for c in each] + [c.params for c in each]
      if latency is not None:  # the head's latency is fixed per output width: it cannot change a comparison
        row += [round(latency_lib.cell_ms(latency, cell, ops, w, size) * 1e6) for w in widths]
      rows.append(row)
    out.append(np.asarray(rows, np.int64).reshape(len(rows), -1))
  return out


def dominators(costs: np.ndarray, errors: np.ndarray, z: float, chunk_elements: int = 1 << 24) -> np.ndarray:
  """Per path, how many other paths cost no more in every column of `costs` (paths, M) and have a
  clearly lower error over the groups of `errors` (paths, G >= 2): paired mean - z * standard error > 0."""
  num_paths, num_groups = errors.shape
  if num_groups < 2:
    raise ValueError(f'paired differences need at least 2 groups of images, got {num_groups}')
  counts = np.zeros(num_paths, np.int64)
  step = max(1, chunk_elements // max(1, num_paths * num_groups))
  for lo in range(0, num_paths, step):
    hi = min(num_paths, lo + step)
    cheaper = np.all(costs[None, :, :] <= costs[lo:hi, None, :], axis=-1)  # [p, q]: q costs no more than p
    cheaper[np.arange(hi - lo), np.arange(lo, hi)] = False
    diff = errors[lo:hi, None, :] - errors[None, :, :]
    clear = diff.mean(-1) - z * diff.std(-1, ddof=1) / np.sqrt(num_groups) > 0
    counts[lo:hi] = np.sum(cheaper & clear, axis=1)
  return counts


def prune_block(
  cell_costs: list[np.ndarray], cell_errors: list[np.ndarray], widths: list[int], keep: int, z: float
) -> list[np.ndarray]:
  """Per cell, a boolean per path: True for the paths to keep rating (fewer than `keep` dominators).

  Paths compete with every path of the block whose cell has the same output width (`widths`, per cell).
  """
  survivors = [np.ones(len(c), bool) for c in cell_costs]
  for width in sorted(set(widths)):
    cells = [c for c, w in enumerate(widths) if w == width]
    counts = dominators(
      np.concatenate([cell_costs[c] for c in cells]), np.concatenate([cell_errors[c] for c in cells]), z
    )
    for c, part in zip(cells, np.split(counts, np.cumsum([len(cell_costs[c]) for c in cells])[:-1])):
      survivors[c] = part < keep
  return survivors
