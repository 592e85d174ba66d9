"""Teacher forward throughput: EfficientNet B0/B7 as DNA runs it (jitted, inference BN, stem..block 6).

  python benchmarks/teacher_forward.py [--variants b0,b7] [--batch 8] [--resolution 224] [--steps 5]
      [--peak_gflops 157] [--full]

Random weights (speed does not depend on their values), images 0..255. Compile time is measured
apart and excluded from the throughput. FLOPs come from XLA's cost analysis of the compiled
function (for convolutions that is 2 x multiply-accumulates). --peak_gflops defaults to 157 GFLOP/s,
the fp32 peak of this project's 2-core CPU (2 cores x 32 FLOP/cycle x 2.45 GHz): give your device's.
--full also runs the head (logits); DNA only needs the six block outputs.

Measured (2-core AMD Zen3 CPU, jax 0.10.2, fp32, batch 8, 224 px), see the report in the issue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import teacher
from dna_jax.models import efficientnet


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
  return {'compile_s': compile_s, 'step_s': statistics.median(times), 'flops': flops}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', default='b0,b7')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--peak_gflops', type=float, default=157.0,
                      help='device fp32 peak in GFLOP/s (default: 157, the 2-core CPU this project is tested on)')
  parser.add_argument('--full', action='store_true', help='include the head (logits)')
  args = parser.parse_args(argv)
  try:
    variants = [efficientnet.variant_name(v) for v in args.variants.split(',') if v.strip()]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  device = jax.devices()[0]
  print(f'device: {device.platform} {device.device_kind} x{jax.device_count()}; batch {args.batch}, '
        f'{args.resolution} px, {"full net" if args.full else "stem..block 6"}, peak {args.peak_gflops:g} GFLOP/s')
  print('| teacher | batch | res | compile s | s/batch | img/s | GFLOP/img | GFLOP/s | % of peak |')
  print('|---|---|---|---|---|---|---|---|---|')
  for variant in variants:
    result = measure(variant, args.batch, args.resolution, args.steps, args.full)
    gflops = result['flops'] / result['step_s'] / 1e9
    print(f"| {variant.upper()} | {args.batch} | {args.resolution} | {result['compile_s']:.1f} | "
          f"{result['step_s']:.3f} | {args.batch / result['step_s']:.1f} | {result['flops'] / args.batch / 1e9:.2f} | "
          f"{gflops:.1f} | {100 * gflops / args.peak_gflops:.1f} |", flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
