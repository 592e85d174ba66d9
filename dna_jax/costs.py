"""Exact analytic parameter and FLOP counts of child networks.

Convention (that of the published DNA/EfficientNet numbers, an early ptflops):
FLOPs = multiply-accumulates of every convolution and dense layer, plus one per
output element of each conv bias, plus two per element of each BatchNorm, plus the
input elements of the head's global average pool. Activations, SE pooling/gating and
residual adds are not counted. `macs` is the plain multiply-accumulate count.
Parameters: all trainable weights (BN scale/bias included, running statistics not).

Costs are additive per block: a block's cost includes its first layer, whose input
width is the previous block's width (hence `in_channels`), and, for the last block,
the head's 1x1 conv and BN (which depend only on the last block's width). The rest
of the stem/DS/head is the `fixed_cost`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from dna_jax import space as space_lib


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int = 0
  flops: int = 0
  macs: int = 0

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.params + other.params, self.flops + other.flops, self.macs + other.macs)


def conv_cost(in_ch: int, out_ch: int, kernel: int, out_pixels: int, groups: int = 1, bias: bool = False) -> Cost:
  macs = out_pixels * out_ch * (in_ch // groups) * kernel * kernel
  params = out_ch * (in_ch // groups) * kernel * kernel + (out_ch if bias else 0)
  return Cost(params, macs + (out_pixels * out_ch if bias else 0), macs)


def bn_cost(channels: int, pixels: int) -> Cost:
  return Cost(2 * channels, 2 * channels * pixels, 0)


def mbconv_cost(
  in_ch: int, out_ch: int, expansion: int, kernel: int, stride: int, size: int, padding: str = 'tf_same'
) -> tuple[Cost, int]:
  """Cost of one MBConv on a `size` x `size` input, and its output size."""
  hidden = in_ch * expansion
  out_size = space_lib.output_size(size, kernel, stride, padding)
  cost = Cost()
  if expansion != 1:
    cost += conv_cost(in_ch, hidden, 1, size * size) + bn_cost(hidden, size * size)
  out_pixels = out_size * out_size
  cost += conv_cost(hidden, hidden, kernel, out_pixels, groups=hidden) + bn_cost(hidden, out_pixels)
  squeeze = space_lib.se_width(in_ch)
  cost += conv_cost(hidden, squeeze, 1, 1, bias=True) + conv_cost(squeeze, hidden, 1, 1, bias=True)
  cost += conv_cost(hidden, out_ch, 1, out_pixels) + bn_cost(out_ch, out_pixels)
  return cost, out_size


def supernet_cell_macs(
  layer_shapes: Sequence[tuple[int, int, int]], size: int, stem: tuple[int, int, int] | None = None
) -> tuple[int, list[list[int]]]:
  """Per-image MACs of a distillation cell on a `size` x `size` input.

  `layer_shapes`: (input channels, output channels, stride) per layer; `stem`: (stem width,
  DS width, stem stride) of a block-1 cell. Returns the stem + DS MACs (0 without a stem) and,
  per layer, the MACs of every candidate op in `space.OPS` order.
  """
  stem_macs = 0
  if stem is not None:
    stem_width, ds_width, stem_stride = stem
    size = space_lib.output_size(size, 3, stem_stride, 'tf_same')
    stem_macs = conv_cost(3, stem_width, 3, size * size).macs + mbconv_cost(stem_width, ds_width, 1, 3, 1, size)[0].macs
  per_layer = []
  for cin, cout, stride in layer_shapes:
    per_op = [mbconv_cost(cin, cout, op.expansion, op.kernel, stride, size) for op in space_lib.OPS]
    per_layer.append([cost.macs for cost, _ in per_op])
    size = per_op[0][1]
  return stem_macs, per_layer


def cell_cost(
  cell: space_lib.Cell, ops: Sequence[int], in_channels: int, size: int, head_width: int | None = None
) -> Cost:
  """Additive cost of one block of the child net; `head_width` adds the head conv+BN (last block)."""
  cost = Cost()
  channels = in_channels
  for l, op_id in enumerate(ops):
    op = space_lib.OPS[op_id]
    layer, size = mbconv_cost(channels, cell.width, op.expansion, op.kernel, cell.stride if l == 0 else 1, size)
    cost += layer
    channels = cell.width
  if head_width is not None:
    cost += conv_cost(cell.width, head_width, 1, size * size) + bn_cost(head_width, size * size)
  return cost


def fixed_cost(
  stem_width: int,
  ds_width: int,
  head_width: int,
  resolution: int,
  final_size: int,
  num_classes: int,
  stem_stride: int = 2,
) -> Cost:
  """Stem conv+BN, the DS block, the head's pool and classifier: what no search choice changes."""
  size = space_lib.output_size(resolution, 3, stem_stride, 'tf_same')
  cost = conv_cost(3, stem_width, 3, size * size) + bn_cost(stem_width, size * size)
  cost += mbconv_cost(stem_width, ds_width, 1, 3, 1, size)[0]
  pool = Cost(0, head_width * final_size * final_size, 0)
  classifier = Cost(head_width * num_classes + num_classes, head_width * num_classes, head_width * num_classes)
  return cost + pool + classifier


def architecture_cost(
  arch: space_lib.Architecture, resolution: int = 224, num_classes: int = 1000, stem_stride: int = 2
) -> tuple[Cost, list[Cost]]:
  """Total cost and the per-block costs (fixed part not included in the per-block list)."""
  sizes = space_lib.block_sizes(arch, resolution, stem_stride)
  per_block = []
  channels = arch.ds_width
  for k, (choice, size) in enumerate(zip(arch.blocks, sizes)):
    last = k == len(arch.blocks) - 1
    per_block.append(cell_cost(choice.cell, choice.ops, channels, size, arch.head_width if last else None))
    channels = choice.cell.width
  total = fixed_cost(
    arch.stem_width,
    arch.ds_width,
    arch.head_width,
    resolution,
    space_lib.final_size(arch, resolution, stem_stride),
    num_classes,
    stem_stride,
  )
  for cost in per_block:
    total += cost
  return total, per_block
