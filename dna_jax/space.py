"""The DNA search space as data: candidate ops, cells, blocks, architectures.

Every later stage reads this module. A search space is a tuple of blocks; a block
holds one or more cells (alternative depth/width of that block); each layer of a
cell picks one of the six candidate MBConv ops. An architecture picks, for every
block, one cell and one op per layer of that cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import itertools
import json
import math
from typing import Any

from etils import epath


@dataclasses.dataclass(frozen=True)
class Op:
  """One candidate operation: an MBConv with squeeze-excitation 0.25 and swish."""

  kernel: int
  expansion: int

  @property
  def name(self) -> str:
    return f'k{self.kernel}e{self.expansion}'


# DNA's index order: expansion 6 with kernels 3/5/7, then expansion 3.
OPS: tuple[Op, ...] = (Op(3, 6), Op(5, 6), Op(7, 6), Op(3, 3), Op(5, 3), Op(7, 3))
OP_NAMES: tuple[str, ...] = tuple(op.name for op in OPS)
NUM_OPS = len(OPS)


def op_index(name: str) -> int:
  """Index of an op given its printed name, e.g. 'k5e3' -> 4."""
  try:
    return OP_NAMES.index(name)
  except ValueError:
    raise ValueError(f'unknown op {name!r}; valid ops: {", ".join(OP_NAMES)}') from None


def ops_string(ops: Sequence[int]) -> str:
  """Human string of a path, e.g. (0, 4, 4) -> 'k3e6-k5e3-k5e3'."""
  return '-'.join(OP_NAMES[i] for i in ops)


def parse_ops(text: str) -> tuple[int, ...]:
  """Inverse of `ops_string`."""
  return tuple(op_index(name) for name in text.strip().split('-'))


# ----------------------------------------------------------------------------- shape rules
# Written once, here, for the analytic costs (NumPy only) and the Flax layers alike.


def conv_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """(before, after) padding of one spatial axis: 'tf_same' (TensorFlow SAME) or 'symmetric' (PyTorch)."""
  if padding == 'symmetric':
    pad = ((stride - 1) + (kernel - 1)) // 2
    return pad, pad
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def output_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Spatial size after a conv with the given padding convention."""
  before, after = conv_padding(size, kernel, stride, padding)
  return (size + before + after - kernel) // stride + 1


def se_width(in_channels: int, ratio: float = 0.25) -> int:
  """Squeeze width of SE: a fraction of the block's input channels, at least 1."""
  return max(1, int(in_channels * ratio))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One alternative of a block: `layers` MBConv layers at `width` channels.

  The first layer carries `stride`. In the child net every layer outputs `width`;
  in the distillation supernet the last layer outputs the teacher's width instead.
  `pinned` fixes the op of some layers (one op index or None per layer; () pins none):
  a pinned layer is trained, rated and searched with its one op only (the authors fixed
  block 6 to k3e6 so).
  """

  layers: int
  width: int
  stride: int
  pinned: tuple[int | None, ...] = ()

  def __post_init__(self):
    if self.layers < 1 or self.width < 1 or self.stride not in (1, 2):
      raise ValueError(f'invalid cell {self}: need layers >= 1, width >= 1, stride 1 or 2')
    if self.pinned and (
      len(self.pinned) != self.layers or any(op is not None and not 0 <= op < NUM_OPS for op in self.pinned)
    ):
      raise ValueError(f'cell {self.layers}@{self.width}: pinned must give one op index or None per layer')
    if self.pinned and all(op is None for op in self.pinned):
      object.__setattr__(self, 'pinned', ())

  @property
  def name(self) -> str:
    if not self.pinned:
      return f'{self.layers}@{self.width}'
    return f'{self.layers}@{self.width}=' + '-'.join('*' if op is None else OP_NAMES[op] for op in self.pinned)

  def layer_ops(self, l: int) -> tuple[int, ...]:
    """The op indices layer l may take."""
    if self.pinned and self.pinned[l] is not None:
      return (self.pinned[l],)
    return tuple(range(NUM_OPS))

  @property
  def num_paths(self) -> int:
    return math.prod(len(self.layer_ops(l)) for l in range(self.layers))

  def paths(self) -> Iterator[tuple[int, ...]]:
    """Every path of this cell in lexicographic order of op indices."""
    return itertools.product(*(self.layer_ops(l) for l in range(self.layers)))

  def allows(self, ops: Sequence[int]) -> bool:
    """True when `ops` is a path of this cell."""
    return len(ops) == self.layers and all(op in self.layer_ops(l) for l, op in enumerate(ops))

  def path_index(self, ops: Sequence[int]) -> int:
    """Position of `ops` in `paths()` order."""
    index = 0
    for l, op in enumerate(ops):
      allowed = self.layer_ops(l)
      index = index * len(allowed) + allowed.index(int(op))
    return index

  @property
  def shape(self) -> Cell:
    """The cell without pinned ops: what an architecture's block is."""
    return Cell(self.layers, self.width, self.stride)


@dataclasses.dataclass(frozen=True)
class Block:
  """A searchable block, cut at one teacher stage (`teacher_width` channels)."""

  cells: tuple[Cell, ...]
  teacher_width: int

  def __post_init__(self):
    if not self.cells:
      raise ValueError('a block needs at least one cell')
    strides = {cell.stride for cell in self.cells}
    if len(strides) != 1:
      raise ValueError(f'all cells of a block must share the stride of its teacher stage, got {strides}')

  @property
  def stride(self) -> int:
    return self.cells[0].stride

  @property
  def num_paths(self) -> int:
    return sum(cell.num_paths for cell in self.cells)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Blocks plus the fixed parts of the child net around them."""

  blocks: tuple[Block, ...]
  stem_width: int = 32
  ds_width: int = 16
  head_width: int = 1280

  @property
  def num_architectures(self) -> int:
    return math.prod(block.num_paths for block in self.blocks)

  def to_dict(self) -> dict[str, Any]:
    def cell(c: Cell) -> dict[str, Any]:
      record = {'layers': c.layers, 'width': c.width, 'stride': c.stride}
      if c.pinned:  # only then: spaces without pins keep the record they always had
        record['pinned'] = [None if op is None else OP_NAMES[op] for op in c.pinned]
      return record

    return {
      'stem_width': self.stem_width,
      'ds_width': self.ds_width,
      'head_width': self.head_width,
      'blocks': [{'teacher_width': b.teacher_width, 'cells': [cell(c) for c in b.cells]} for b in self.blocks],
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
    """Builds a space from plain data (a config's `space` entry or `to_dict` output)."""
    try:
      blocks = []
      for block in data['blocks']:
        cells = tuple(
          Cell(
            int(c['layers']),
            int(c['width']),
            int(c['stride']),
            tuple(None if op is None else op_index(op) for op in c.get('pinned', ())),
          )
          for c in block['cells']
        )
        blocks.append(Block(cells, int(block['teacher_width'])))
    except (KeyError, TypeError) as e:
      raise ValueError(
        f'malformed search space: missing or bad field {e} '
        "(expected {'blocks': [{'teacher_width': int, 'cells': "
        "[{'layers', 'width', 'stride'}]}]})"
      ) from None
    if not blocks:
      raise ValueError('a search space needs at least one block')
    return cls(
      tuple(blocks), int(data.get('stem_width', 32)), int(data.get('ds_width', 16)), int(data.get('head_width', 1280))
    )


def _cell(spec: str, stride: int) -> Cell:
  """'3@24' (every op free), '1@320=k3e6' (every layer pinned to k3e6) or '3@24=*-*-k3e6' (per layer)."""
  shape, _, pins = spec.partition('=')
  layers, width = shape.split('@')
  pinned: tuple[int | None, ...] = ()
  if pins:
    names = pins.split('-')
    if len(names) == 1:
      names = names * int(layers)
    if len(names) != int(layers):
      raise ValueError(f'cell {spec!r}: give one op for every layer or {layers} ops (* for a free layer)')
    pinned = tuple(None if name == '*' else op_index(name) for name in names)
  return Cell(int(layers), int(width), stride, pinned)


def _cells(spec: str, stride: int) -> tuple[Cell, ...]:
  """'2@24,3@24,1@32=k3e6' -> cells."""
  return tuple(_cell(c.strip(), stride) for c in spec.split(','))


def default_imagenet_space(block6: str = '1@320=k3e6') -> SearchSpace:
  """DNA's ImageNet space, cut at EfficientNet-B7 stages 2..7; block 6 pinned to k3e6 as the authors did."""
  return SearchSpace(
    (
      Block(_cells('2@24,3@24', 2), 48),
      Block(_cells('2@40,3@40,4@40', 2), 80),
      Block(_cells('2@80,3@80,4@80', 2), 160),
      Block(_cells('3@112,4@96,4@112', 1), 224),
      Block(_cells('4@192,5@160,5@192', 2), 384),
      Block(_cells(block6, 1), 640),
    )
  )


@dataclasses.dataclass(frozen=True)
class BlockChoice:
  """One block of an architecture: a cell and one op index per layer."""

  cell: Cell
  ops: tuple[int, ...]

  def __post_init__(self):
    if len(self.ops) != self.cell.layers:
      raise ValueError(f'cell {self.cell.name} has {self.cell.layers} layers but {len(self.ops)} ops were given')
    if any(not 0 <= i < NUM_OPS for i in self.ops):
      raise ValueError(f'op indices must lie in [0, {NUM_OPS}), got {self.ops}')


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A standalone child network: fixed stem/DS/head widths plus one choice per block."""

  blocks: tuple[BlockChoice, ...]
  stem_width: int = 32
  ds_width: int = 16
  head_width: int = 1280

  def __str__(self) -> str:
    return to_string(self)

  def to_dict(self) -> dict[str, Any]:
    return {
      'string': to_string(self),
      'stem_width': self.stem_width,
      'ds_width': self.ds_width,
      'head_width': self.head_width,
      'blocks': [
        {'layers': b.cell.layers, 'width': b.cell.width, 'stride': b.cell.stride, 'ops': [OP_NAMES[i] for i in b.ops]}
        for b in self.blocks
      ],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
    if not isinstance(data, Mapping) or 'blocks' not in data:
      raise ValueError("architecture JSON must be an object with a 'blocks' list")
    blocks = []
    for k, b in enumerate(data['blocks']):
      where = f'blocks[{k}]'
      if not isinstance(b, Mapping):
        raise ValueError(f'{where}: expected an object, got {b!r}')
      for key in ('width', 'stride', 'ops'):
        if key not in b:
          raise ValueError(f'{where}: missing field {key!r}')
      ops = b['ops']
      if isinstance(ops, str):
        ops = ops.split('-')
      try:
        op_ids = tuple(op_index(o) if isinstance(o, str) else int(o) for o in ops)
        blocks.append(BlockChoice(Cell(int(b.get('layers', len(op_ids))), int(b['width']), int(b['stride'])), op_ids))
      except (ValueError, TypeError) as e:
        raise ValueError(f'{where}: {e}') from None
    if not blocks:
      raise ValueError("architecture JSON: 'blocks' is empty")
    return cls(
      tuple(blocks), int(data.get('stem_width', 32)), int(data.get('ds_width', 16)), int(data.get('head_width', 1280))
    )

  @classmethod
  def from_json(cls, text: str) -> Architecture:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'not valid JSON: {e}') from None
    return cls.from_dict(data)


def to_string(arch: Architecture) -> str:
  """Short human form: '24s2:k5e3-k3e3-k3e6/40s2:...'; stem/DS/head widths only when not default."""
  body = '/'.join(f'{b.cell.width}s{b.cell.stride}:{ops_string(b.ops)}' for b in arch.blocks)
  if (arch.stem_width, arch.ds_width, arch.head_width) != (32, 16, 1280):
    body = f'{arch.stem_width},{arch.ds_width},{arch.head_width}|{body}'
  return body


def from_string(text: str) -> Architecture:
  """Inverse of `to_string`."""
  widths = (32, 16, 1280)
  if '|' in text:
    head, text = text.split('|', 1)
    widths = tuple(int(x) for x in head.split(','))
  blocks = []
  for part in text.strip().split('/'):
    try:
      shape, ops = part.split(':')
      width, stride = shape.split('s')
      op_ids = parse_ops(ops)
      blocks.append(BlockChoice(Cell(len(op_ids), int(width), int(stride)), op_ids))
    except ValueError as e:
      raise ValueError(
        f'cannot parse block {part!r} of architecture string: {e} (expected WIDTHsSTRIDE:kKeE-kKeE...)'
      ) from None
  return Architecture(tuple(blocks), *widths)


def locate(space: SearchSpace, arch: Architecture) -> tuple[int, ...] | None:
  """Cell index of every block of `arch` in `space`, or None if `arch` is not in it."""
  if len(arch.blocks) != len(space.blocks):
    return None
  if (arch.stem_width, arch.ds_width, arch.head_width) != (space.stem_width, space.ds_width, space.head_width):
    return None
  found = []
  for choice, block in zip(arch.blocks, space.blocks):
    matches = [c for c, cell in enumerate(block.cells) if cell.shape == choice.cell.shape and cell.allows(choice.ops)]
    if not matches:
      return None
    found.append(matches[0])
  return tuple(found)


def make_architecture(space: SearchSpace, choices: Sequence[tuple[int, Sequence[int]]]) -> Architecture:
  """Architecture from (cell index, ops) per block of `space`."""
  if len(choices) != len(space.blocks):
    raise ValueError(f'space has {len(space.blocks)} blocks, got {len(choices)} choices')
  blocks = tuple(BlockChoice(block.cells[c].shape, tuple(ops)) for block, (c, ops) in zip(space.blocks, choices))
  return Architecture(blocks, space.stem_width, space.ds_width, space.head_width)


def _named(table: str) -> Architecture:
  blocks = []
  for row in table.strip().splitlines():
    width, stride, ops = row.split()
    op_ids = tuple(op_index(o) for o in ops.split(','))
    blocks.append(BlockChoice(Cell(len(op_ids), int(width), int(stride)), op_ids))
  return Architecture(tuple(blocks))


# The published nets (hidden width, stride of first layer, ops per layer).
NAMED_ARCHITECTURES: dict[str, Architecture] = {
  'efficientnet_b0': _named("""
        24 2 k3e6,k3e6
        40 2 k5e6,k5e6
        80 2 k3e6,k3e6,k3e6
        112 1 k5e6,k5e6,k5e6
        192 2 k5e6,k5e6,k5e6,k5e6
        320 1 k3e6"""),
  'dna_a': _named("""
        24 2 k5e3,k3e3,k3e6
        40 2 k3e3,k3e3,k5e3,k3e6
        80 2 k7e6,k3e3,k5e3,k3e6
        96 1 k5e6,k5e3,k5e3,k5e6
        160 2 k5e6,k5e3,k5e3,k5e3,k5e6
        320 1 k3e6"""),
  'dna_b': _named("""
        24 2 k3e3,k5e3,k7e6
        40 2 k7e6,k5e3,k7e6
        80 2 k5e6,k5e3,k5e3,k3e6
        96 1 k5e6,k5e3,k5e3,k5e6
        192 2 k7e6,k5e3,k5e3,k5e3,k7e6
        320 1 k3e6"""),
  'dna_c': _named("""
        24 2 k5e6,k3e6
        40 2 k5e6,k5e6,k3e6,k5e6
        80 2 k5e6,k3e6,k5e6,k5e6
        112 1 k3e6,k5e6,k5e6,k5e3
        192 2 k5e6,k5e3,k5e6,k5e6
        320 1 k3e6"""),
  'dna_d': _named("""
        24 2 k7e6,k5e6,k7e6
        40 2 k7e6,k7e6,k7e6,k7e6
        80 2 k7e6,k5e6,k5e6,k7e6
        112 1 k7e6,k5e6,k7e6,k5e6
        192 2 k7e6,k5e6,k5e6,k5e6,k7e6
        320 1 k3e6"""),
}


def named_architecture(name: str) -> Architecture:
  """One of NAMED_ARCHITECTURES, with an error listing valid names."""
  try:
    return NAMED_ARCHITECTURES[name]
  except KeyError:
    raise ValueError(f'unknown architecture {name!r}; valid names: {", ".join(NAMED_ARCHITECTURES)}') from None


def load_architecture(name_or_path: str) -> Architecture:
  """A named architecture, a path to an architecture JSON file, or an architecture string."""
  if name_or_path in NAMED_ARCHITECTURES:
    return NAMED_ARCHITECTURES[name_or_path]
  if name_or_path.endswith('.json'):
    try:
      text = epath.Path(name_or_path).read_text()
    except OSError as e:
      raise ValueError(f'cannot read architecture file {name_or_path}: {e.strerror or e}') from None
    try:
      return Architecture.from_json(text)
    except ValueError as e:
      raise ValueError(f'{name_or_path}: {e}') from None
  if ':' in name_or_path:
    return from_string(name_or_path)
  raise ValueError(
    f'unknown architecture {name_or_path!r}: give one of {", ".join(NAMED_ARCHITECTURES)}, '
    'a path to an architecture .json file, or an architecture string'
  )


NAMED_SPACES = {
  'imagenet': default_imagenet_space,
  # Block 6 searched too (the published nets' budgets assume it fixed to k3e6).
  'imagenet_free6': lambda: default_imagenet_space(block6='1@320'),
}


def parse_space(blocks: str, stem_width: int = 32, ds_width: int = 16, head_width: int = 1280) -> SearchSpace:
  """A space from a named space or 'STRIDE TEACHER_WIDTH CELLS; ...' (cells as 'LAYERS@WIDTH,...').

  '2 48 2@24,3@24; 2 80 2@40' is two blocks: stride 2 cut at a 48-wide teacher stage with
  cells of 2 and 3 layers at 24 channels, then stride 2, teacher 80, one 2-layer cell at 40.
  A cell may pin ops: '1@320=k3e6' (every layer), '3@24=*-*-k3e6' (the last layer only).
  """
  if blocks in NAMED_SPACES:
    named = NAMED_SPACES[blocks]()
    return dataclasses.replace(named, stem_width=stem_width, ds_width=ds_width, head_width=head_width)
  parsed = []
  for k, part in enumerate(p for p in blocks.split(';') if p.strip()):
    try:
      stride, teacher_width, cells = part.split()
      parsed.append(Block(_cells(cells, int(stride)), int(teacher_width)))
    except ValueError as e:
      raise ValueError(
        f'space block {k + 1} {part.strip()!r}: {e}; expected "STRIDE TEACHER_WIDTH '
        f'LAYERS@WIDTH,..." or one of {", ".join(NAMED_SPACES)}'
      ) from None
  if not parsed:
    raise ValueError(f'empty search space {blocks!r}')
  return SearchSpace(tuple(parsed), stem_width, ds_width, head_width)


def space_from_config(config: Any) -> SearchSpace:
  """The search space of a config's `space` section."""
  return parse_space(config.blocks, config.stem_width, config.ds_width, config.head_width)


# ----------------------------------------------------------------------------- shapes of a space or net


def block_input_widths(space: SearchSpace, block_index: int) -> list[int]:
  """Possible input widths of a block in the child net: the widths of the previous block's cells."""
  if block_index == 0:
    return [space.ds_width]
  return sorted({cell.width for cell in space.blocks[block_index - 1].cells})


def _stride(block: Block | BlockChoice) -> int:
  return block.stride if isinstance(block, Block) else block.cell.stride


def block_sizes(space_or_arch: SearchSpace | Architecture, resolution: int, stem_stride: int = 2) -> list[int]:
  """Input spatial size of every block of the child net (strides are fixed per block)."""
  size = output_size(resolution, 3, stem_stride, 'tf_same')
  sizes = []
  for block in space_or_arch.blocks:
    sizes.append(size)
    size = output_size(size, 3, _stride(block), 'tf_same')
  return sizes


def final_size(space_or_arch: SearchSpace | Architecture, resolution: int, stem_stride: int = 2) -> int:
  """Spatial size of the last block's output (the head's input)."""
  size = block_sizes(space_or_arch, resolution, stem_stride)[-1]
  return output_size(size, 3, _stride(space_or_arch.blocks[-1]), 'tf_same')


def supernet_input_sizes(space: SearchSpace, image_size: int, stem_stride: int) -> list[int]:
  """Spatial size of each block's distillation-supernet input (block 1 reads the image itself)."""
  return [image_size] + block_sizes(space, image_size, stem_stride)[1:]


def parse_block_numbers(text: str, num_blocks: int, what: str = 'blocks') -> list[int]:
  """'' -> every block; '2,3' -> [1, 2] (0-based); a clear error naming `what` for bad numbers."""
  if not text.strip():
    return list(range(num_blocks))
  try:
    chosen = sorted({int(b) - 1 for b in text.split(',') if b.strip()})
  except ValueError:
    raise ValueError(f'{what}={text!r}: expected comma-separated block numbers 1..{num_blocks}') from None
  if not chosen or chosen[0] < 0 or chosen[-1] >= num_blocks:
    raise ValueError(f'{what}={text!r}: block numbers must lie in 1..{num_blocks}')
  return chosen
