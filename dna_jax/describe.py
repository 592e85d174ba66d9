"""Print the per-block table and totals of an architecture.

python -m dna_jax.describe dna_a
python -m dna_jax.describe path/to/arch.json --json --resolution 192 --num_classes 10
python -m dna_jax.describe dna_a --latency_table DIR   (predicted latency beside the FLOPs)
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags

from dna_jax import cli
from dna_jax import costs
from dna_jax import latency_table
from dna_jax import space as space_lib


def describe(
  arch: space_lib.Architecture,
  resolution: int = 224,
  num_classes: int = 1000,
  stem_stride: int = 2,
  table: latency_table.LatencyTable | None = None,
) -> dict[str, Any]:
  """Per-block rows and totals as plain data; with a latency table, predicted milliseconds too."""
  total, per_block = costs.architecture_cost(arch, resolution, num_classes, stem_stride)
  sizes = space_lib.block_sizes(arch, resolution, stem_stride)
  fixed = costs.fixed_cost(
    arch.stem_width,
    arch.ds_width,
    arch.head_width,
    resolution,
    space_lib.final_size(arch, resolution, stem_stride),
    num_classes,
    stem_stride,
  )
  rows = []
  channels = arch.ds_width
  for k, (choice, size, cost) in enumerate(zip(arch.blocks, sizes, per_block), start=1):
    rows.append(
      {
        'block': k,
        'ops': space_lib.ops_string(choice.ops),
        'in_channels': channels,
        'channels': choice.cell.width,
        'stride': choice.cell.stride,
        'resolution': size,
        'params': cost.params,
        'flops': cost.flops,
        'macs': cost.macs,
      }
    )
    if table is not None:
      rows[-1]['latency_ms'] = latency_table.cell_ms(table, choice.cell, choice.ops, channels, size)
    channels = choice.cell.width
  info = {
    'arch': str(arch),
    'resolution': resolution,
    'num_classes': num_classes,
    'blocks': rows,
    'fixed': {'params': fixed.params, 'flops': fixed.flops, 'macs': fixed.macs},
    'params': total.params,
    'flops': total.flops,
    'macs': total.macs,
  }
  if table is not None:
    info['latency_ms'] = latency_table.predict_ms(table, arch, resolution, num_classes, stem_stride)
    info['fixed']['latency_ms'] = info['latency_ms'] - sum(row['latency_ms'] for row in rows)
    info['latency_target'] = f'{table.meta["target"]}, {table.meta["threads"]} thread(s), {table.meta["device"]}'
  return info


def format_table(info: dict[str, Any]) -> str:
  timed = 'latency_ms' in info
  ms = lambda row: f' {row["latency_ms"]:>8.3f}' if timed else ''
  lines = [
    f'{info["arch"]}',
    '',
    f'{"block":>5}  {"ops":<34} {"in":>4} {"out":>4} {"s":>1} {"res":>4} {"params":>10} {"MFLOPs":>9}'
    + (f' {"ms":>8}' if timed else ''),
  ]
  for row in info['blocks']:
    lines.append(
      f'{row["block"]:>5}  {row["ops"]:<34} {row["in_channels"]:>4} {row["channels"]:>4} '
      f'{row["stride"]:>1} {row["resolution"]:>4} {row["params"]:>10,} {row["flops"] / 1e6:>9.2f}{ms(row)}'
    )
  fixed = info['fixed']
  lines.append(
    f'{"fixed":>5}  {"stem, DS block, head pool, classifier":<34} {"":>4} {"":>4} {"":>1} {"":>4} '
    f'{fixed["params"]:>10,} {fixed["flops"] / 1e6:>9.2f}{ms(fixed)}'
  )
  lines.append('')
  lines.append(
    f'total at {info["resolution"]}x{info["resolution"]}, {info["num_classes"]} classes: '
    f'{info["params"]:,} params, {info["flops"] / 1e6:.2f} MFLOPs '
    f'({info["macs"] / 1e6:.2f} M multiply-accumulates)'
  )
  if timed:
    lines.append(f'predicted latency {info["latency_ms"]:.3f} ms ({info["latency_target"]})')
  return '\n'.join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_bool('json', False, 'Print one JSON object.', flag_values=FLAGS)
flags.DEFINE_integer('resolution', 224, 'Input resolution.', flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1000, 'Classes of the classifier.', flag_values=FLAGS)
flags.DEFINE_string('latency_table', None, 'A latency table directory (python -m dna_jax.latency).', flag_values=FLAGS)
flags.DEFINE_integer('stem_stride', 2, 'Stride of the stem (1 for the 32 px demo nets).', flag_values=FLAGS)


def main(argv: list[str]) -> int:
  """ARCH: one of the named nets, a path to an architecture JSON file, or an architecture string."""
  if len(argv) != 1:
    raise ValueError(
      f'give one architecture: one of {", ".join(space_lib.NAMED_ARCHITECTURES)}, a path to an architecture '
      'JSON file, or an architecture string'
    )
  if FLAGS.resolution < 1 or FLAGS.num_classes < 1:
    raise ValueError('--resolution and --num_classes must be positive')
  table = latency_table.read(FLAGS.latency_table) if FLAGS.latency_table else None
  arch = space_lib.load_architecture(argv[0])
  info = describe(arch, FLAGS.resolution, FLAGS.num_classes, FLAGS.stem_stride, table)
  print(json.dumps(info) if FLAGS.json else format_table(info))
  return 0


if __name__ == '__main__':
  cli.run(main, FLAGS)
