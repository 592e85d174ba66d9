"""Per-path ratings tables: written by the rating stage, read by the search and by users.

Layout of `WORKDIR/ratings/`:
  meta.json    the space (`SearchSpace.to_dict()`), resolution, num_classes, stem_stride,
               the fixed stem/DS/head cost and the (1-based) blocks whose table is complete.
  block_K.csv  K = 1..N, columns `block,cell,ops,in_channels,score,mse,flops,params,macs`:
               one row per path of every cell and per possible input width of the block
               (the widths of the previous block's cells; most blocks have one). `score` is
               the relative L1 error mean|S-T|/std(T) (lower is better), `mse` the MSE;
               flops/params/macs are the block's additive cost in the retrained child net
               (`costs.cell_cost`; the last block includes the head conv and BN).

Block indices in this module's functions are 0-based (as in `costs.py`); block numbers in
file names, the `block` column and meta.json are 1-based. Reading never imports JAX.
"""

from __future__ import annotations

from collections.abc import Mapping
import csv
import dataclasses
import io
import math
import os
from typing import Any

from etils import epath
import numpy as np

from dna_jax import costs
from dna_jax import files
from dna_jax import space as space_lib

COLUMNS = ('block', 'cell', 'ops', 'in_channels', 'score', 'mse', 'flops', 'params', 'macs')
META = 'meta.json'
IMAGES = 'images'  # optional last column: how many rating images the path's score rests on


def block_file(ratings_dir: str, block_index: int) -> str:
  """Path of the table of 0-based block `block_index`."""
  return os.path.join(ratings_dir, f'block_{block_index + 1}.csv')


@dataclasses.dataclass(frozen=True)
class BlockRatings:
  """One block's table as arrays, one entry per (path, in_channels) row, in file order."""

  cell: np.ndarray  # int, index into `space.blocks[k].cells`
  path: np.ndarray  # int, index of the path in `cell.paths()` order
  ops: tuple[tuple[int, ...], ...]
  in_channels: np.ndarray  # int, child-net input width the costs assume
  score: np.ndarray  # float64, relative L1
  mse: np.ndarray  # float64
  flops: np.ndarray  # int64, additive block cost
  params: np.ndarray  # int64
  macs: np.ndarray  # int64
  latency: np.ndarray | None = None  # int64 ns, predicted from a latency table (latency_table.with_latency)
  images: np.ndarray | None = None  # int64, rating images per row (None: files without the column)

  def __len__(self) -> int:
    return len(self.score)

  @property
  def pruned(self) -> np.ndarray:
    """Rows whose rating adaptive rating stopped early (fewer images than the block's others)."""
    if self.images is None or not len(self.images):
      return np.zeros(len(self), bool)
    return self.images < self.images.max()

  @property
  def each_path_once(self) -> np.ndarray:
    """The rows of the block's narrowest input width: every path once, cells in order, each cell's paths
    in `cell.paths()` order (rows repeat per input width with the same score)."""
    return self.in_channels == self.in_channels.min()

  def row(self, cell: int, path: int, in_channels: int) -> int:
    """Row index of a (cell, path index, in_channels); ValueError if absent."""
    found = np.flatnonzero((self.cell == cell) & (self.path == path) & (self.in_channels == in_channels))
    if not len(found):
      raise ValueError(f'no rating for cell {cell} path {path} in_channels {in_channels}')
    return int(found[0])


@dataclasses.dataclass(frozen=True)
class Ratings:
  """Everything the search needs: the space, per-block tables and the fixed cost."""

  space: space_lib.SearchSpace
  blocks: tuple[BlockRatings, ...]
  resolution: int
  num_classes: int
  stem_stride: int
  fixed_flops: int
  fixed_params: int
  fixed_macs: int
  directory: str = ''
  fixed_latency: int = 0  # ns, with a latency table
  pruned_for_top_k: int = 0  # adaptive rating: pruned rows are in none of the best this-many nets (0: none pruned)
  pruned_costs: tuple[str, ...] = ()  # the costs that pruning held: flops, params, latency:TABLE_DIR


def architecture_rows(ratings: Ratings, arch: space_lib.Architecture) -> tuple[int, ...] | None:
  """Row index of every block of `arch` in `ratings`, or None if the space does not contain it."""
  cells = space_lib.locate(ratings.space, arch)
  if cells is None:
    return None
  rows = []
  width = ratings.space.ds_width
  for block, space_block, cell, choice in zip(ratings.blocks, ratings.space.blocks, cells, arch.blocks):
    rows.append(block.row(cell, space_block.cells[cell].path_index(choice.ops), width))
    width = choice.cell.width
  return tuple(rows)


def architecture_rating(ratings: Ratings, arch: space_lib.Architecture) -> dict[str, Any] | None:
  """Summed score and total flops/params/macs (fixed part included) of `arch`, or None if not in the space."""
  rows = architecture_rows(ratings, arch)
  if rows is None:
    return None
  pick = list(zip(ratings.blocks, rows))
  return {
    'score': float(sum(float(b.score[r]) for b, r in pick)),
    'flops': ratings.fixed_flops + sum(int(b.flops[r]) for b, r in pick),
    'params': ratings.fixed_params + sum(int(b.params[r]) for b, r in pick),
    'macs': ratings.fixed_macs + sum(int(b.macs[r]) for b, r in pick),
  }


OBJECTIVES = ('sum', 'norm_sum', 'product')
OBJECTIVE_LABELS = {
  'sum': 'summed block score (relative L1)',
  'norm_sum': 'summed per-block normalised score',
  'product': 'summed log block score (log of the product)',
}


def with_objective(ratings: Ratings, objective: str) -> Ratings:
  """`ratings` whose block scores are the search's per-block terms for `objective`.

  'sum' (the default): the relative L1 scores, summed over blocks. The authors' process_potential.py
  offers two more: 'norm_sum' (their norm_mse) z-normalises each block's scores over all its paths
  (unbiased std, as torch) and maps them to (z + 2) / 4 before summing; 'product' multiplies the scores,
  which the exact search does as a sum of their logarithms. A block with one path gets a constant term.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f'search objective {objective!r}; valid: {", ".join(OBJECTIVES)}')
  if objective == 'sum':
    return ratings
  blocks = []
  for table in ratings.blocks:
    if objective == 'product':
      if np.any(table.score <= 0):
        raise ValueError("the 'product' objective needs positive scores")
      score = np.log(table.score)
    else:
      per_path = table.score[table.each_path_once]
      std = float(np.std(per_path, ddof=1)) if len(per_path) > 1 else 0.0
      z = (table.score - float(np.mean(per_path))) / std if std > 0 else np.zeros_like(table.score)
      score = (z + 2.0) / 4.0
    blocks.append(dataclasses.replace(table, score=score))
  return dataclasses.replace(ratings, blocks=tuple(blocks))


# ----------------------------------------------------------------------------- writing


def _meta_record(space: space_lib.SearchSpace, resolution: int, num_classes: int, stem_stride: int) -> dict[str, Any]:

  fixed = costs.fixed_cost(
    space.stem_width,
    space.ds_width,
    space.head_width,
    resolution,
    space_lib.final_size(space, resolution, stem_stride),
    num_classes,
    stem_stride,
  )
  return {
    'space': space.to_dict(),
    'resolution': int(resolution),
    'num_classes': int(num_classes),
    'stem_stride': int(stem_stride),
    'fixed': {'flops': fixed.flops, 'params': fixed.params, 'macs': fixed.macs},
    'complete_blocks': [],
  }


def _read_json(path: str) -> dict[str, Any]:
  data = files.read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f'{path}, line 1: expected a JSON object')
  return data


def write_meta(
  ratings_dir: str, space: space_lib.SearchSpace, resolution: int, num_classes: int, stem_stride: int = 2
) -> None:
  """Creates `meta.json`; keeps the completed blocks of an identical existing one, refuses a different one."""
  epath.Path(ratings_dir).mkdir(parents=True, exist_ok=True)
  record = _meta_record(space, resolution, num_classes, stem_stride)
  path = os.path.join(ratings_dir, META)
  if epath.Path(path).exists():
    old = _read_json(path)
    keys = ('space', 'resolution', 'num_classes', 'stem_stride', 'fixed')
    changed = [k for k in keys if old.get(k) != record[k]]
    if changed:
      raise ValueError(
        f'{path} describes other ratings (different {", ".join(changed)}); '
        'use a fresh ratings directory or delete the old one'
      )
    record['complete_blocks'] = sorted(int(k) for k in old.get('complete_blocks', []))
    for key in ('pruned_for_top_k', 'pruned_costs'):
      if old.get(key):
        record[key] = old[key]
  files.write_json(path, record)


def _check_values(name: str, values: Mapping[int, np.ndarray], block: space_lib.Block, block_index: int) -> dict:
  expected = set(range(len(block.cells)))
  if set(values) != expected:
    raise ValueError(
      f'{name} of block {block_index + 1} must have one array per cell index {sorted(expected)}, '
      f'got keys {sorted(values)}'
    )
  out = {}
  for c, cell in enumerate(block.cells):
    array = np.asarray(values[c], dtype=np.float64)
    if array.shape != (cell.num_paths,):
      raise ValueError(
        f'{name}[{c}] of block {block_index + 1} (cell {cell.name}) must have shape '
        f'({cell.num_paths},), got {array.shape}'
      )
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
      ops = next(p for i, p in enumerate(cell.paths()) if i == bad[0])
      raise ValueError(
        f'{name}[{c}] of block {block_index + 1} (cell {cell.name}) is not finite for '
        f'{len(bad)} paths, e.g. {space_lib.ops_string(ops)}: {array[bad[0]]}'
      )
    out[c] = array
  return out


def write_block_ratings(
  ratings_dir: str,
  space: space_lib.SearchSpace,
  block_index: int,
  scores: Mapping[int, np.ndarray],
  mses: Mapping[int, np.ndarray],
  *,
  resolution: int,
  num_classes: int,
  stem_stride: int = 2,
  images: Mapping[int, np.ndarray] | None = None,
  pruned_for_top_k: int = 0,
  pruned_costs: tuple[str, ...] = ('flops', 'params'),
) -> str:
  """Writes `block_{block_index+1}.csv` atomically and marks the block complete in meta.json.

  `scores[c]` / `mses[c]` (and `images[c]`, the rating images each score rests on): one value per
  path of cell `c`, in `cell.paths()` order. Costs are computed here for every possible input width.
  `pruned_for_top_k`: adaptive rating stopped the paths with fewer images because they are in none of
  the best this-many nets under budgets on `pruned_costs`. Returns the path written.
  """

  if not 0 <= block_index < len(space.blocks):
    raise ValueError(f'block_index {block_index} out of range: the space has {len(space.blocks)} blocks (0-based)')
  block = space.blocks[block_index]
  scores = _check_values('scores', scores, block, block_index)
  mses = _check_values('mses', mses, block, block_index)
  if images is None:
    images = {c: np.zeros(cell.num_paths) for c, cell in enumerate(block.cells)}
  images = _check_values('images', images, block, block_index)
  write_meta(ratings_dir, space, resolution, num_classes, stem_stride)
  size = space_lib.block_sizes(space, resolution, stem_stride)[block_index]
  head = space.head_width if block_index == len(space.blocks) - 1 else None
  lines = [','.join(COLUMNS + (IMAGES,))]
  for c, cell in enumerate(block.cells):
    for p, ops in enumerate(cell.paths()):
      text = space_lib.ops_string(ops)
      for width in space_lib.block_input_widths(space, block_index):
        cost = costs.cell_cost(cell, ops, width, size, head)
        lines.append(
          f'{block_index + 1},{cell.name},{text},{width},{float(scores[c][p])!r},'
          f'{float(mses[c][p])!r},{cost.flops},{cost.params},{cost.macs},{round(float(images[c][p]))}'
        )
  path = block_file(ratings_dir, block_index)
  files.atomic_write_text(path, '\n'.join(lines) + '\n')
  meta_path = os.path.join(ratings_dir, META)
  meta = _read_json(meta_path)
  meta['complete_blocks'] = sorted(set(meta.get('complete_blocks', [])) | {block_index + 1})
  counts = np.concatenate([np.asarray(images[c]) for c in sorted(images)])
  pruned = meta.get('pruned_for_top_k', {})
  pruned.pop(str(block_index + 1), None)
  if pruned_for_top_k and counts.min() < counts.max():
    pruned[str(block_index + 1)] = int(pruned_for_top_k)
    meta['pruned_costs'] = list(pruned_costs)
  meta['pruned_for_top_k'] = pruned
  files.write_json(meta_path, meta)
  return path


def block_complete(ratings_dir: str, block_index: int) -> bool:
  """True when block `block_index` (0-based) has its table written and recorded in meta.json."""
  path = os.path.join(ratings_dir, META)
  if not epath.Path(path).exists() or not epath.Path(block_file(ratings_dir, block_index)).exists():
    return False
  try:
    return block_index + 1 in _read_json(path).get('complete_blocks', [])
  except ValueError:
    return False


# ----------------------------------------------------------------------------- reading


def _read_meta(ratings_dir: str) -> tuple[dict[str, Any], space_lib.SearchSpace]:
  path = os.path.join(ratings_dir, META)
  if not epath.Path(path).exists():
    raise ValueError(f'{path}: missing (no ratings here; run the rating stage first)')
  meta = _read_json(path)
  try:
    space = space_lib.SearchSpace.from_dict(meta['space'])
    for key in ('resolution', 'num_classes', 'stem_stride'):
      meta[key] = int(meta[key])
    meta['fixed'] = {k: int(meta['fixed'][k]) for k in ('flops', 'params', 'macs')}
    meta['complete_blocks'] = [int(k) for k in meta.get('complete_blocks', [])]
    meta['pruned_for_top_k'] = {int(k): int(v) for k, v in meta.get('pruned_for_top_k', {}).items()}
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f'{path}: malformed ratings meta ({type(e).__name__}: {e}); expected keys space, '
      'resolution, num_classes, stem_stride, fixed{flops,params,macs}, complete_blocks'
    ) from None
  return meta, space


def _read_block(path: str, space: space_lib.SearchSpace, block_index: int) -> BlockRatings:
  block = space.blocks[block_index]
  cell_ids = {cell.name: c for c, cell in enumerate(block.cells)}
  widths = set(space_lib.block_input_widths(space, block_index))
  ops_cache: dict[tuple[int, str], tuple[tuple[int, ...], int]] = {}
  cols: dict[str, list] = {
    name: [] for name in ('cell', 'path', 'ops', 'in_channels', 'score', 'mse', 'flops', 'params', 'macs')
  }
  seen: dict[tuple[int, int, int], int] = {}
  try:
    text = epath.Path(path).read_text()
  except OSError as e:
    raise ValueError(
      f'{path}: cannot read ({e.strerror or e}); ratings of block {block_index + 1} are missing'
    ) from None
  reader = csv.reader(io.StringIO(text, newline=''))
  header = next(reader, None)
  columns = tuple(h.strip() for h in header or [])
  if columns not in (COLUMNS, COLUMNS + (IMAGES,)):
    raise ValueError(f'{path}, line 1: expected header {",".join(COLUMNS)}[,{IMAGES}], got {",".join(header or [])!r}')
  images: list[int] = []
  for line, row in enumerate(reader, start=2):
    if not row:
      continue
    where = f'{path}, line {line}'
    if len(row) != len(columns):
      raise ValueError(f'{where}: expected {len(columns)} fields ({",".join(columns)}), got {len(row)}')
    try:
      number = int(row[0])
      width = int(row[3])
      score, mse = float(row[4]), float(row[5])
      flops, params, macs = int(row[6]), int(row[7]), int(row[8])
      if len(columns) > len(COLUMNS):
        images.append(int(row[9]))
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None
    if number != block_index + 1:
      raise ValueError(f'{where}: block is {number}, expected {block_index + 1}')
    if row[1] not in cell_ids:
      raise ValueError(f'{where}: cell {row[1]!r} is not in block {block_index + 1} (cells {", ".join(cell_ids)})')
    cell = cell_ids[row[1]]
    key = (cell, row[2])
    if key not in ops_cache:
      try:
        ops = space_lib.parse_ops(row[2])
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
      if len(ops) != block.cells[cell].layers:
        raise ValueError(f'{where}: ops {row[2]!r} has {len(ops)} layers, cell {row[1]} has {block.cells[cell].layers}')
      if not block.cells[cell].allows(ops):
        raise ValueError(f'{where}: ops {row[2]!r} are not a path of cell {row[1]} (a layer is pinned)')
      ops_cache[key] = (ops, block.cells[cell].path_index(ops))
    ops, index = ops_cache[key]
    if width not in widths:
      raise ValueError(
        f'{where}: in_channels {width} is not a possible input width of block '
        f'{block_index + 1} (expected one of {sorted(widths)})'
      )
    if not (math.isfinite(score) and math.isfinite(mse)):
      raise ValueError(f'{where}: score and mse must be finite, got {row[4]}, {row[5]}')
    if min(flops, params, macs) < 0:
      raise ValueError(f'{where}: negative cost')
    if (cell, index, width) in seen:
      raise ValueError(
        f'{where}: duplicate of line {seen[cell, index, width]} (cell {row[1]}, ops {row[2]}, in_channels {width})'
      )
    seen[cell, index, width] = line
    for name, value in zip(cols, (cell, index, ops, width, score, mse, flops, params, macs)):
      cols[name].append(value)
  expected = block.num_paths * len(widths)
  if len(seen) != expected:
    missing = next(
      (c, ops, w)
      for c, cell in enumerate(block.cells)
      for i, ops in enumerate(cell.paths())
      for w in sorted(widths)
      if (c, i, w) not in seen
    )
    raise ValueError(
      f'{path}: {len(seen)} rows, expected {expected} (every path of every cell for each '
      f'in_channels in {sorted(widths)}); missing e.g. cell {block.cells[missing[0]].name} '
      f'ops {space_lib.ops_string(missing[1])} in_channels {missing[2]}'
    )
  ints = lambda name: np.asarray(cols[name], dtype=np.int64)
  return BlockRatings(
    cell=ints('cell'),
    path=ints('path'),
    ops=tuple(cols['ops']),
    in_channels=ints('in_channels'),
    score=np.asarray(cols['score'], np.float64),
    mse=np.asarray(cols['mse'], np.float64),
    flops=ints('flops'),
    params=ints('params'),
    macs=ints('macs'),
    images=np.asarray(images, np.int64) if len(columns) > len(COLUMNS) else None,
  )


def read_ratings(ratings_dir: str) -> Ratings:
  """Reads meta.json and every block table; ValueError naming the file (and line) on any problem."""
  meta, space = _read_meta(ratings_dir)
  missing = [k + 1 for k in range(len(space.blocks)) if k + 1 not in meta['complete_blocks']]
  if missing:
    raise ValueError(
      f'{os.path.join(ratings_dir, META)}: ratings incomplete, blocks {missing} not rated yet '
      f'(complete: {meta["complete_blocks"] or "none"})'
    )
  blocks = tuple(_read_block(block_file(ratings_dir, k), space, k) for k in range(len(space.blocks)))
  fixed = meta['fixed']
  return Ratings(
    space,
    blocks,
    meta['resolution'],
    meta['num_classes'],
    meta['stem_stride'],
    fixed['flops'],
    fixed['params'],
    fixed['macs'],
    ratings_dir,
    pruned_for_top_k=min(meta['pruned_for_top_k'].values(), default=0),
    pruned_costs=tuple(meta.get('pruned_costs', ())) if meta['pruned_for_top_k'] else (),
  )
