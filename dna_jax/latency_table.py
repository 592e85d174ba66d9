"""Latency tables (NumPy only): measured milliseconds of every piece a net of a space is built from.

A table is two files in a directory, written by `python -m dna_jax.latency` on the device it describes
(and copyable from a phone-like device back to the search host):

  latency.csv   piece,in_channels,out_channels,hidden,kernel,stride,size,ms,ms_p10,ms_p90,repeats
                piece 'mbconv': one candidate op (hidden = its expansion) on a size x size input;
                piece 'stem': stem conv + BN + swish + the depthwise-separable block (in 3 channels,
                hidden = stem width, out = DS width, size = the image); piece 'head': 1x1 conv + BN +
                swish + pool + classifier (hidden = classes, out = head width, size = its input).
                ms is the time (the smallest median of the timing rounds, latency.py), ms_p10/ms_p90
                the spread of all `repeats` timed runs.
  latency.json  metadata: target, device, threads, library versions, date, resolution, num_classes,
                stem/ds/head widths, and `offset_ms`, the per-net constant fitted against whole nets
                (per-piece sums miss what a whole graph shares, e.g. one interpreter call per net).

A net's predicted latency is offset + stem + every layer's op + head; latency is additive per block
given the previous block's width, like FLOPs, so the exact search takes it as a third budget
(`with_latency` gives the ratings a `latency` cost in integer nanoseconds).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any

from etils import epath
import numpy as np

from dna_jax import files
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib

COLUMNS = (
  'piece',
  'in_channels',
  'out_channels',
  'hidden',
  'kernel',
  'stride',
  'size',
  'ms',
  'ms_p10',
  'ms_p90',
  'repeats',
)
TABLE, META = 'latency.csv', 'latency.json'
Key = tuple[str, int, int, int, int, int, int]  # piece, in, out, hidden, kernel, stride, size


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """Measured pieces: key -> (median ms, p10 ms, p90 ms, repeats), and the metadata."""

  entries: dict[Key, tuple[float, float, float, int]]
  meta: dict[str, Any]

  @property
  def offset_ms(self) -> float:
    return float(self.meta.get('offset_ms', 0.0))

  def ms(self, key: Key) -> float:
    if key not in self.entries:
      piece, cin, cout, hidden, kernel, stride, size = key
      raise ValueError(
        f'the latency table ({self.meta.get("directory", "?")}) has no {piece} with in_channels={cin}, '
        f'out_channels={cout}, hidden={hidden}, kernel={kernel}, stride={stride}, size={size}: measure it for '
        'this space and resolution (python -m dna_jax.latency --space ...)'
      )
    return self.entries[key][0]


def mbconv_key(op: space_lib.Op, cin: int, cout: int, stride: int, size: int) -> Key:
  return ('mbconv', cin, cout, op.expansion, op.kernel, stride, size)


def stem_key(space_or_arch: Any, resolution: int, stem_stride: int) -> Key:
  return ('stem', 3, space_or_arch.ds_width, space_or_arch.stem_width, 3, stem_stride, resolution)


def head_key(width: int, head_width: int, num_classes: int, size: int) -> Key:
  return ('head', width, head_width, num_classes, 1, 1, size)


def space_keys(space: space_lib.SearchSpace, resolution: int, num_classes: int, stem_stride: int) -> list[Key]:
  """Every piece a net of `space` at `resolution` can contain (each once, in space order)."""
  keys = {stem_key(space, resolution, stem_stride): None}
  sizes = space_lib.block_sizes(space, resolution, stem_stride)
  final = space_lib.final_size(space, resolution, stem_stride)
  for k, (block, size) in enumerate(zip(space.blocks, sizes)):
    for cell in block.cells:
      for cin in space_lib.block_input_widths(space, k):
        layer_size, channels = size, cin
        for l in range(cell.layers):
          stride = cell.stride if l == 0 else 1
          for op_id in cell.layer_ops(l):
            keys[mbconv_key(space_lib.OPS[op_id], channels, cell.width, stride, layer_size)] = None
          layer_size, channels = space_lib.output_size(layer_size, 3, stride, 'tf_same'), cell.width
  for width in sorted({cell.width for cell in space.blocks[-1].cells}):
    keys[head_key(width, space.head_width, num_classes, final)] = None
  return list(keys)


def cell_ms(table: LatencyTable, cell: space_lib.Cell, ops: tuple[int, ...], in_channels: int, size: int) -> float:
  """Predicted milliseconds of one block of a child net (every layer's op)."""
  total, channels = 0.0, in_channels
  for l, op_id in enumerate(ops):
    stride = cell.stride if l == 0 else 1
    total += table.ms(mbconv_key(space_lib.OPS[op_id], channels, cell.width, stride, size))
    size, channels = space_lib.output_size(size, 3, stride, 'tf_same'), cell.width
  return total


def predict_ms(
  table: LatencyTable, arch: space_lib.Architecture, resolution: int, num_classes: int, stem_stride: int = 2
) -> float:
  """A whole net's predicted latency: offset + stem + every layer + head."""
  sizes = space_lib.block_sizes(arch, resolution, stem_stride)
  total = table.offset_ms + table.ms(stem_key(arch, resolution, stem_stride))
  channels = arch.ds_width
  for choice, size in zip(arch.blocks, sizes):
    total += cell_ms(table, choice.cell, choice.ops, channels, size)
    channels = choice.cell.width
  final = space_lib.final_size(arch, resolution, stem_stride)
  return total + table.ms(head_key(channels, arch.head_width, num_classes, final))


def with_latency(ratings: ratings_lib.Ratings, table: LatencyTable) -> ratings_lib.Ratings:
  """`ratings` with a `latency` cost per row (integer nanoseconds: sums stay exact) and a fixed latency."""
  ns = lambda ms: round(ms * 1e6)
  space = ratings.space
  sizes = space_lib.block_sizes(space, ratings.resolution, ratings.stem_stride)
  final = space_lib.final_size(space, ratings.resolution, ratings.stem_stride)
  blocks = []
  for k, (block, rated) in enumerate(zip(space.blocks, ratings.blocks)):
    last = k == len(space.blocks) - 1
    values = np.empty(len(rated), np.int64)
    for i in range(len(rated)):
      cell = block.cells[int(rated.cell[i])]
      ms = cell_ms(table, cell, rated.ops[i], int(rated.in_channels[i]), sizes[k])
      if last:
        ms += table.ms(head_key(cell.width, space.head_width, ratings.num_classes, final))
      values[i] = ns(ms)
    blocks.append(dataclasses.replace(rated, latency=values))
  fixed = ns(table.offset_ms + table.ms(stem_key(space, ratings.resolution, ratings.stem_stride)))
  return dataclasses.replace(ratings, blocks=tuple(blocks), fixed_latency=fixed)


# ----------------------------------------------------------------------------- files


def write(directory: str, entries: dict[Key, tuple[float, float, float, int]], meta: dict[str, Any]) -> None:
  """latency.csv and latency.json in `directory` (atomically)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(COLUMNS)
  for key, (ms, p10, p90, repeats) in entries.items():
    writer.writerow([*key, repr(ms), repr(p10), repr(p90), repeats])
  files.atomic_write_text(os.path.join(directory, TABLE), out.getvalue())
  files.write_json(os.path.join(directory, META), meta)


def read(directory: str) -> LatencyTable:
  """The table in `directory`; a ValueError naming the file and line on any problem."""
  meta = files.read_json(os.path.join(directory, META))
  if not isinstance(meta, dict) or 'target' not in meta:
    raise ValueError(f'{os.path.join(directory, META)}: expected a JSON object with the table metadata (target, ...)')
  path = os.path.join(directory, TABLE)
  try:
    rows = list(csv.reader(io.StringIO(epath.Path(path).read_text(), newline='')))
  except OSError as e:
    raise ValueError(f'{path}: cannot read ({e.strerror or e})') from None
  if not rows or tuple(rows[0]) != COLUMNS:
    raise ValueError(f'{path}, line 1: expected header {",".join(COLUMNS)}')
  entries = {}
  for line, row in enumerate(rows[1:], start=2):
    try:
      if len(row) != len(COLUMNS) or row[0] not in ('mbconv', 'stem', 'head'):
        raise ValueError(f'expected {len(COLUMNS)} fields and a piece mbconv, stem or head')
      key = (row[0], *(int(v) for v in row[1:7]))
      entries[key] = (float(row[7]), float(row[8]), float(row[9]), int(row[10]))
    except ValueError as e:
      raise ValueError(f'{path}, line {line}: {e}') from None
  return LatencyTable(entries, {**meta, 'directory': directory})


def check_covers(
  table: LatencyTable, space: space_lib.SearchSpace, resolution: int, num_classes: int, stem_stride: int
) -> None:
  """A clear error when the table lacks a piece the space needs (before any search)."""
  for key in space_keys(space, resolution, num_classes, stem_stride):
    table.ms(key)
