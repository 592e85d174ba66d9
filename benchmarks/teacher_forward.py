"""Teacher forward throughput: EfficientNet B0/B7 as DNA runs it (jitted, inference BN, stem..block 6).

  python benchmarks/teacher_forward.py [--variants b0,b7] [--batch 8] [--resolution 224] [--steps 5]
      [--peak_gflops 157] [--full]

Random weights (speed does not depend on their values), images 0..255. Compile time is measured
apart and excluded from the throughput. Achieved GFLOP/s = 2 x the analytic multiply-accumulate
count (convolutions, SE and dense layers; dna_jax.costs) / time; XLA's own cost-analysis FLOPs are
printed beside it as a cross-check (on GPU they miss library convolutions). --peak_gflops defaults to 157 GFLOP/s,
the fp32 peak of this project's 2-core CPU (2 cores x 32 FLOP/cycle x 2.45 GHz): give your device's.
--full also runs the head (logits); DNA only needs the six block outputs.

Measured, stem..block 6, fp32, 224 px, compile excluded (CPU shared with other jobs, load 6-9):
  2-core Zen3 CPU, jax 0.10.2, batch 8: B0 0.12-0.24 s/batch (33-66 img/s); B7 1.08-1.28 s/batch
    (6.2-7.4 img/s, 5.09 GMAC/img, 63-76 GFLOP/s = 40-48% of 157); compile 5 s (B0), 9 s (B7).
  H100, jax 0.11.2: B7 776 img/s at batch 8, 2463 img/s at batch 64; B0 13k img/s at batch 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import costs
from dna_jax import host_memory
from dna_jax import teacher
from dna_jax.models import efficientnet
from dna_jax.models.layers import output_size


def analytic_macs(model: efficientnet.EfficientNet, resolution: int, full: bool) -> int:
  """Multiply-accumulates of one image: stem, every MBConv (SE included) and, if `full`, the head."""
  size = output_size(resolution, 3, model.stem_stride, model.conventions.padding)
  channels = model.scaled_width(model.stem_width)
  macs = costs.conv_cost(3, channels, 3, size * size).macs
  for stage in efficientnet.scaled_stages(model):
    for j in range(stage.repeats):
      cost, size = costs.mbconv_cost(
        channels,
        stage.width,
        stage.expansion,
        stage.kernel,
        stage.stride if j == 0 else 1,
        size,
        model.conventions.padding,
      )
      macs += cost.macs
      channels = stage.width
  if full:
    head = model.scaled_width(model.head_width)
    macs += costs.conv_cost(channels, head, 1, size * size).macs + head * model.num_classes
  return macs


def measure(variant: str, batch: int, resolution: int, steps: int, full: bool) -> dict[str, float]:
  """Compile seconds, seconds per batch (median of `steps`) and XLA FLOPs per batch."""
  model = efficientnet.variant(variant)
  up_to = None if full else efficientnet.num_blocks(model)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (batch, resolution, resolution, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(images[:1])
  forward = jax.jit(lambda v, x: teacher.teacher_features(model, v, x, up_to=up_to))
  start = time.perf_counter()
  compiled = forward.lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  jax.block_until_ready(compiled(variables, images))  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, images))
    times.append(time.perf_counter() - start)
  return {
    'compile_s': compile_s,
    'step_s': statistics.median(times),
    'xla_flops': flops,
    'macs': analytic_macs(model, resolution, full) * batch,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', default='b0,b7')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument(
    '--peak_gflops',
    type=float,
    default=157.0,
    help='device fp32 peak in GFLOP/s (default: 157, the 2-core CPU this project is tested on)',
  )
  parser.add_argument('--full', action='store_true', help='include the head (logits)')
  args = parser.parse_args(argv)
  try:
    variants = [efficientnet.variant_name(v) for v in args.variants.split(',') if v.strip()]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  device = jax.devices()[0]
  print(
    f'device: {device.platform} {device.device_kind} x{jax.device_count()}; batch {args.batch}, '
    f'{args.resolution} px, {"full net" if args.full else "stem..block 6"}, peak {args.peak_gflops:g} GFLOP/s'
  )
  print('| teacher | batch | res | compile s | s/batch | img/s | GMAC/img | XLA GFLOP/img | GFLOP/s | % of peak |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for variant in variants:
    result = measure(variant, args.batch, args.resolution, args.steps, args.full)
    gflops = 2 * result['macs'] / result['step_s'] / 1e9
    print(
      f'| {variant.upper()} | {args.batch} | {args.resolution} | {result["compile_s"]:.1f} | '
      f'{result["step_s"]:.3f} | {args.batch / result["step_s"]:.1f} | {result["macs"] / args.batch / 1e9:.2f} | '
      f'{result["xla_flops"] / args.batch / 1e9:.2f} | {gflops:.1f} | {100 * gflops / args.peak_gflops:.1f} |',
      flush=True,
    )
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
