"""Distillation step speed: one teacher pass + every cell of every block, against the alternatives.

  PYTHONPATH=. python benchmarks/distill_step.py [--space imagenet|small] [--batch 8] [--steps 3]
      [--dtype float32|bfloat16] [--teacher_bn inference|train] [--remat op|dots|none]
      [--depthwise_baseline] [--matmul_baseline] [--skip_separate] [--memory_batch 64] [--no_full] [--peak_gflops 157]

--space imagenet: all 15 cells of `space.default_imagenet_space()`, EfficientNet-B7 teacher, 224 px
(batch 8 by default). --space small: the demo space '2 16 1@8,2@8; 2 24 2@12,3@12; 1 32 1@16,2@16'
(stem 16, DS 8, stem stride 1) against the 'tiny' teacher at 32 px (batch 128 by default).
Random weights and images (speed does not depend on their values); one device, the step run as
`parallel.data_parallel(distill_steps.distill_step, --parallel)` as training runs it (default shard_map;
pmap gives the same program on one device).

Measured (median of --steps runs after one warm-up; compile time measured apart and excluded):
  (a) full step: teacher once (up to the last block) + every cell fwd+bwd + Adam;
  (b) teacher forward alone (jit of teacher_features, the same up_to);
  (c) student part alone: the same step fed precomputed teacher features;
  (d) 'separate': one step per block k with only that block's cells and the teacher re-run up to
      block k (what per-block training would cost), summed over blocks;
  (e) the authors' way, estimated: the teacher re-run (up to the cell's block) for every cell,
      sum over cells of teacher(up_to=k) (each measured) + (c).
FLOPs: XLA's cost analysis of the compiled program (`cost_analysis()['flops']`). XLA charges a
`lax.switch` its costliest branch, so for the student it counts the k7e6 op on every layer: an upper
bound. The 'analytic' column is 2 x multiply-accumulates of the teacher plus 3 x (fwd+bwd) the mean
over the 6 ops of each student layer (dna_jax.costs), i.e. the expected work of a random path.
Memory: the process's peak RSS after the full step (ru_maxrss: includes the compiler and the
teacher weights), the device's peak bytes where the backend reports them, and XLA's
`memory_analysis()` of the full step lowered and compiled (never run) at --memory_batch per device:
argument + output + temp - aliased bytes.
--no_full skips compiling the all-cells program (for the ImageNet space its XLA:CPU compile grew past
16 GiB of host memory on the 24 GiB test machine) and estimates (a) = teacher(up_to=6) + the sum over
blocks of [(d_k) - teacher(up_to=k)], (c) likewise, and the memory from the per-block programs'
memory_analysis at --batch, temp extrapolated linearly to --memory_batch (all labelled as estimates).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine_load
from benchmarks import random_variables
from benchmarks import tap_sum_baselines
from dna_jax import costs
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.models import layers
from dna_jax.models import supernet

SMALL_SPACE = '2 16 1@8,2@8; 2 24 2@12,3@12; 1 32 1@16,2@16'
GiB = 1024**3


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def compile_and_time(fn, args, steps: int) -> dict[str, float]:
  """Compile seconds (tracing, lowering and XLA; the first two also apart), median seconds per call
  (after one warm-up) and XLA FLOPs of jitted `fn`."""
  start = time.perf_counter()
  traced = fn.trace(*args)
  trace_s = time.perf_counter() - start
  lowered = traced.lower()
  lower_s = time.perf_counter() - start - trace_s
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  m = compiled.memory_analysis()
  memory = (
    None
    if m is None
    else {
      'args': m.argument_size_in_bytes,
      'out': m.output_size_in_bytes,
      'temp': m.temp_size_in_bytes,
      'alias': m.alias_size_in_bytes,
    }
  )
  return {
    'compile_s': compile_s,
    'trace_s': trace_s,
    'lower_s': lower_s,
    'step_s': statistics.median(times),
    'min_s': min(times),
    'flops': xla_flops(compiled),
    'load': machine_load.load(),
    'memory': memory,
  }


def benchmark_space(which: str, batch: int = 0) -> tuple[space_lib.SearchSpace, str, int, int, int]:
  """(space, teacher variant, batch, image size, stem stride) of the distillation benchmarks' --space
  'imagenet' or 'small'; `batch` 0: that space's default (8 or 128)."""
  if which == 'imagenet':
    return space_lib.default_imagenet_space(), 'b7', batch or 8, 224, 2
  return space_lib.parse_space(SMALL_SPACE, 16, 8), 'tiny', batch or 128, 32, 1


def setup(args):
  dtype = layers.ACTIVATION_DTYPES[args.dtype]
  conv = layers.Conventions(dtype=dtype)
  space, teacher_name, _, image, stem_stride = benchmark_space(args.space)
  model = efficientnet.variant(teacher_name, conventions=conv)
  cells = supernet.supernet_cells(space, conventions=conv, stem_stride=stem_stride, remat=args.remat)
  return space, model, cells, image, stem_stride


def analytic_student_macs(space, cells, image: int, stem_stride: int, block_ids) -> int:
  """Fwd multiply-accumulates of one image through every cell of `block_ids`, mean op per layer."""
  sizes = space_lib.supernet_input_sizes(space, image, stem_stride)
  total = 0
  for k in block_ids:
    for cell in cells[k]:
      layer_shapes = [cell.layer_shape(l) for l in range(cell.cell.layers)]
      stem_macs, per_layer = costs.supernet_cell_macs(layer_shapes, sizes[k], cell.stem)
      total += stem_macs + sum(sum(per_op) // len(per_op) for per_op in per_layer)
  return total


def teacher_macs(model, image: int, up_to: int) -> int:
  size = space_lib.output_size(image, 3, model.stem_stride, model.conventions.padding)
  channels = model.scaled_width(model.stem_width)
  macs = costs.conv_cost(3, channels, 3, size * size).macs
  for i, stage in enumerate(efficientnet.scaled_stages(model)):
    if i > up_to:
      break
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
  return macs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--space', choices=('imagenet', 'small'), default='imagenet')
  parser.add_argument('--batch', type=int, default=0, help='default: 8 (imagenet) or 128 (small)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per measurement (median)')
  parser.add_argument('--dtype', choices=tuple(layers.ACTIVATION_DTYPES), default='float32')
  parser.add_argument(
    '--teacher_bn',
    choices=('inference', 'train'),
    default='inference',
    help="teacher BatchNorm: running statistics (dna_jax's default) or the authors' batch stats",
  )
  parser.add_argument(
    '--parallel',
    choices=parallel.MODES,
    default='shard_map',
    help='how the per-device step is mapped (training offers both); one device either way',
  )
  parser.add_argument(
    '--remat', choices=supernet.REMAT, default='op', help='what the backward pass recomputes (distill.remat)'
  )
  parser.add_argument(
    '--no_full',
    action='store_true',
    help='do not compile the all-cells program (its XLA:CPU compile needs > 16 GiB of host memory '
    'for the ImageNet space): estimate (a) and (c) from the per-block programs (d) instead',
  )
  parser.add_argument(
    '--depthwise_baseline',
    action='store_true',
    help='also time (a) with the shift-and-add depthwise conv differentiated by autodiff, with its kernel '
    'gradient summed by one reduction per tap, and that over the whole batch at once (on CPU)',
  )
  parser.add_argument(
    '--matmul_baseline',
    action='store_true',
    help="also time (a) with every 1x1 convolution as Dense's own 4-D contraction (as before; on CPU)",
  )
  parser.add_argument(
    '--init_threads',
    type=int,
    default=2,
    help='threads compiling the supernet initializers (as distill.compile_threads)',
  )
  parser.add_argument('--skip_separate', action='store_true', help='skip (d) and (e) (7-12 more compiles)')
  parser.add_argument('--memory_batch', type=int, default=64, help='per-device batch for memory_analysis (0: skip)')
  parser.add_argument(
    '--peak_gflops',
    type=float,
    default=157.0,
    help='device peak in GFLOP/s (default: 157, fp32 of the 2-core CPU this project is tested on)',
  )
  args = parser.parse_args(argv)
  batch = benchmark_space(args.space, args.batch)[2]
  if batch % jax.device_count():
    print(f'error: --batch {batch} must divide over {jax.device_count()} devices', file=sys.stderr)
    return 1
  space, model, cells, image, stem_stride = setup(args)
  num_blocks = len(space.blocks)
  num_cells = sum(len(c) for c in cells)
  train_bn = args.teacher_bn == 'train'
  device = jax.devices()[0]
  print(
    f'device: {device.platform} {device.device_kind} x{jax.device_count()}; jax {jax.__version__}; '
    f'space {args.space} ({num_blocks} blocks, {num_cells} cells); teacher '
    f'{"B7" if args.space == "imagenet" else "tiny"} ({args.teacher_bn} BN); batch {batch}, {image} px, '
    f'{args.dtype}; peak {args.peak_gflops:g} GFLOP/s; load average at start {machine_load.load()}',
    flush=True,
  )

  rng = np.random.default_rng(0)
  images_np = rng.uniform(0, 255, (1, batch, image, image, 3)).astype(np.float32)
  batch_in = parallel.shard_batch({'image': images_np}, args.parallel)
  images = jnp.asarray(images_np[0])
  t0 = time.perf_counter()
  teacher_vars = random_variables.teacher_variables(model)
  jax.block_until_ready(teacher_vars)
  print(f'teacher variables (random, made on the host) {time.perf_counter() - t0:.1f} s', flush=True)

  sizes = space_lib.supernet_input_sizes(space, image, stem_stride)
  optimizers = {
    f'block{k + 1}': supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
    for k in range(num_blocks)
  }
  t0 = time.perf_counter()
  supernet.compile_link_inits(
    [(cell, sizes[k]) for k in range(num_blocks) for cell in cells[k]], jax.random.key(0), args.init_threads
  )
  states = {
    f'block{k + 1}': supernet_store.create_block_state(
      jax.random.key(k), tuple(cells[k]), sizes[k], optimizers[f'block{k + 1}']
    )
    for k in range(num_blocks)
  }
  jax.block_until_ready(states)
  print(f'supernet init {time.perf_counter() - t0:.1f} s', flush=True)

  def teacher_apply_for(up_to):
    return functools.partial(teacher_lib.teacher_features, model, up_to=up_to, train_mode_bn=train_bn)

  def make_step(block_ids, teacher_apply):
    blocks = tuple((k, tuple(cells[k])) for k in block_ids)
    names = {f'block{k + 1}' for k in block_ids}
    step = functools.partial(
      distill_steps.distill_step,
      blocks=blocks,
      teacher_apply=teacher_apply,
      optimizers={n: o for n, o in optimizers.items() if n in names},
      sampling='uniform',
      seed=0,
    )
    return parallel.data_parallel(step, args.parallel, num_broadcast=1), {n: states[n] for n in names}

  rows = []

  def row(name, result, images_per_step, analytic_flops):
    step_s = result['step_s']
    rows.append(
      (
        name,
        result['compile_s'],
        step_s,
        images_per_step / step_s,
        result['flops'] / 1e9,
        result['flops'] / step_s / 1e9,
        analytic_flops / 1e9,
        analytic_flops / step_s / 1e9,
        result['load'],
      )
    )
    print(
      f'  measured {name}: {step_s:.3f} s/step (min {result["min_s"]:.3f}), compile {result["compile_s"]:.1f} s '
      f'(tracing {result["trace_s"]:.1f} s, lowering {result["lower_s"]:.1f} s), load {result["load"]}',
      flush=True,
    )

  all_ids = list(range(num_blocks))
  t_macs = {k: teacher_macs(model, image, k) * batch for k in range(1, num_blocks + 1)}
  s_macs = analytic_student_macs(space, cells, image, stem_stride, all_ids) * batch

  # (a) the full step.
  full_fn, full_states = make_step(all_ids, teacher_apply_for(num_blocks))
  if not args.no_full:
    full = compile_and_time(full_fn, (full_states, batch_in, teacher_vars), args.steps)
    row(f'(a) full step: teacher once + {num_cells} cells', full, batch, 2 * t_macs[num_blocks] + 6 * s_macs)

    def time_patched_full_step(label: str, *patches: contextlib.AbstractContextManager) -> None:
      """Row (a) again, the step traced with `patches` active, in the same process and at the same load."""
      with contextlib.ExitStack() as stack:
        for patch in patches:
          stack.enter_context(patch)
        fn, _ = make_step(all_ids, teacher_apply_for(num_blocks))
        result = compile_and_time(fn, (full_states, batch_in, teacher_vars), args.steps)
      row(label, result, batch, 2 * t_macs[num_blocks] + 6 * s_macs)

    if args.depthwise_baseline:
      # Every shift-and-add depthwise conv differentiated by JAX (as before its hand-written gradient).
      time_patched_full_step(
        '(a0) full step, depthwise gradient by autodiff', mock.patch.object(layers, 'shift_add_vjp', layers.shift_add)
      )
      # One reduction per kernel tap (as before `layers.tap_sums` summed all taps in one reduction).
      time_patched_full_step(
        '(a2) full step, one reduction per kernel tap, a few examples at a time', tap_sum_baselines.per_tap()
      )
      # That over the whole batch at once (as before `layers.tap_sums` summed a few examples at a time).
      time_patched_full_step(
        '(a1) full step, one reduction per kernel tap over the whole batch',
        tap_sum_baselines.per_tap(),
        mock.patch.object(layers, 'TAP_SUM_CHUNK_BYTES', 2**62),
      )
    if args.matmul_baseline:
      # Every 1x1 convolution differentiated as Dense's own 4-D contraction (as before
      # `layers.channels_matmul` made it one 2-D matmul on CPU).
      time_patched_full_step(
        "(a3) full step, 1x1 convolutions as Dense's 4-D contraction",
        mock.patch.object(layers, 'channels_matmul', jax.lax.dot_general),
      )
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  mem_stats = device.memory_stats() or {}
  device_peak = mem_stats.get('peak_bytes_in_use')

  # (b) the teacher forward alone.
  teacher_fns = {}

  def teacher_time(up_to):
    if up_to not in teacher_fns:
      fn = jax.jit(lambda v, x: teacher_lib.teacher_features(model, v, x, up_to=up_to, train_mode_bn=train_bn))
      teacher_fns[up_to] = compile_and_time(fn, (teacher_vars, images), args.steps)
    return teacher_fns[up_to]

  row(f'(b) teacher forward (up_to={num_blocks})', teacher_time(num_blocks), batch, 2 * t_macs[num_blocks])

  # (c) the student part alone: the same step, teacher features precomputed and passed in.
  if not args.no_full:
    features = jax.jit(teacher_apply_for(num_blocks))(teacher_vars, images)
    student_fn, _ = make_step(all_ids, lambda feats, _images: feats)
    student = compile_and_time(student_fn, (full_states, batch_in, features), args.steps)
    row(f'(c) student part: {num_cells} cells fwd+bwd+Adam', student, batch, 6 * s_macs)

  separate_s = authors_s = None
  per_block = {}
  if not args.skip_separate or args.no_full:
    separate_s = 0.0
    for k in all_ids:
      fn, st = make_step([k], teacher_apply_for(k + 1))
      result = compile_and_time(fn, (st, batch_in, teacher_vars), args.steps)
      per_block[k] = result
      separate_s += result['step_s']
      row(
        f'(d) separate block {k + 1}: teacher up_to={k + 1} + {len(cells[k])} cells',
        result,
        batch,
        2 * t_macs[k + 1] + 6 * analytic_student_macs(space, cells, image, stem_stride, [k]) * batch,
      )
    if args.no_full:
      # Estimates from the per-block programs: block k's student part = (d_k) - teacher(up_to=k+1).
      student_est = sum(max(per_block[k]['step_s'] - teacher_time(k + 1)['step_s'], 0.0) for k in all_ids)
      student = {'step_s': student_est, 'compile_s': float('nan')}
      full = {
        'step_s': teacher_time(num_blocks)['step_s'] + student_est,
        'compile_s': sum(r['compile_s'] for r in per_block.values()),
      }
    authors_s = student['step_s']
    for k in all_ids:
      authors_s += len(cells[k]) * teacher_time(k + 1)['step_s']
    print(
      '  teacher forward by up_to: ' + ', '.join(f'{u}: {r["step_s"]:.3f} s' for u, r in sorted(teacher_fns.items())),
      flush=True,
    )

  memory = None
  if args.memory_batch and not args.no_full:
    if args.parallel == 'pmap':
      abstract = {
        'image': jax.ShapeDtypeStruct((jax.local_device_count(), args.memory_batch, image, image, 3), jnp.float32)
      }
    else:
      sharding = jax.sharding.NamedSharding(parallel.make_mesh(), jax.P(parallel.AXIS))
      abstract = {
        'image': jax.ShapeDtypeStruct(
          (args.memory_batch * jax.device_count(), image, image, 3), jnp.float32, sharding=sharding
        )
      }
    start = time.perf_counter()
    try:
      compiled = full_fn.lower(full_states, abstract, teacher_vars).compile()
      m = compiled.memory_analysis()
      memory = {
        'compile_s': time.perf_counter() - start,
        'args': m.argument_size_in_bytes,
        'out': m.output_size_in_bytes,
        'temp': m.temp_size_in_bytes,
        'alias': m.alias_size_in_bytes,
      }
    except Exception as e:  # pylint: disable=broad-except
      print(f'  memory_analysis at batch {args.memory_batch} failed: {type(e).__name__}: {e}', flush=True)

  print()
  print(
    f'device: {device.platform} {device.device_kind}; space {args.space}, {num_cells} cells, batch {batch}, '
    f'{image} px, {args.dtype}, teacher {args.teacher_bn} BN, {args.parallel}; median of {args.steps} steps; compile excluded'
  )
  print(
    '| measurement | compile s | s/step | img/s | XLA GFLOP/step | XLA GFLOP/s | % of peak (XLA) | '
    'analytic GFLOP/step | analytic GFLOP/s | % of peak (analytic) | load 1/5/15 min |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for name, comp, step_s, ips, gf, gfs, af, afs, ld in rows:
    print(
      f'| {name} | {comp:.1f} | {step_s:.3f} | {ips:.1f} | {gf:.1f} | {gfs:.1f} | {100 * gfs / args.peak_gflops:.1f} | '
      f'{af:.1f} | {afs:.1f} | {100 * afs / args.peak_gflops:.1f} | {ld} |'
    )
  full_s, teacher_s, student_s = full['step_s'], teacher_time(num_blocks)['step_s'], student['step_s']
  print()
  print('| summary | value |')
  print('|---|---|')
  if args.no_full:
    print(
      f'| full step (a), ESTIMATED (not compiled): teacher(up_to={num_blocks}) + sum over blocks of '
      f'[(d_k) - teacher(up_to=k)] | {full_s:.3f} s = {batch / full_s:.1f} img/s (the {num_blocks} per-block '
      f'programs compiled in {full["compile_s"]:.0f} s together) |'
    )
  else:
    print(
      f'| full step (a) | {full_s:.3f} s = {batch / full_s:.1f} img/s (compile {full["compile_s"]:.1f} s, excluded) |'
    )
  print(
    f'| teacher share | (b)/(a) = {100 * teacher_s / full_s:.0f}%; 1 - (c)/(a) = {100 * (1 - student_s / full_s):.0f}% |'
  )
  print(f'| teacher (b) + student (c) | {teacher_s:.3f} + {student_s:.3f} = {teacher_s + student_s:.3f} s |')
  if separate_s is not None:
    print(
      f'| (d) separate, one step per block (sum of {num_blocks}) | {separate_s:.3f} s: full step is {separate_s / full_s:.2f}x faster |'
    )
    print(
      f"| (e) authors' way, estimated: teacher re-run per cell + (c) | {authors_s:.3f} s: full step is "
      f'{authors_s / full_s:.2f}x faster |'
    )
  if args.no_full and per_block and all(r['memory'] for r in per_block.values()):
    # jit drops unused arguments (a block-k program holds only the teacher up to block k), so the
    # all-cells step's arguments are counted from the trees themselves.
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    scale = (args.memory_batch or batch) / batch
    args_b = nbytes(full_states) + nbytes(teacher_vars) + images.nbytes * scale
    temp_b = sum(r['memory']['temp'] for r in per_block.values())
    temps = ', '.join(f'{r["memory"]["temp"] / GiB:.2f}' for r in per_block.values())
    total = args_b + nbytes(full_states) + temp_b * scale
    print(
      f'| memory_analysis of the {num_blocks} per-block programs at batch {batch} | temp summed over blocks '
      f'{temp_b / GiB:.2f} GiB (blocks 1..{num_blocks}: {temps}) |'
    )
    if args.memory_batch:
      print(
        f'| per-device memory of the all-cells step at batch {args.memory_batch}, EXTRAPOLATED: arguments '
        f'{args_b / GiB:.2f} + new states {nbytes(full_states) / GiB:.2f} + summed temp x {scale:g} (linear in '
        f'batch; an upper bound) | {total / GiB:.2f} GiB; {"fits" if total < 16 * GiB else "does NOT fit"} '
        'a 16 GiB TPU v5e chip |'
      )
  print(f'| peak RSS of the process{"" if args.no_full else " after (a)"} | {peak_rss / GiB:.2f} GiB |')
  if device_peak is not None:
    print(f'| device peak bytes in use after (a) | {device_peak / GiB:.2f} GiB |')
  if memory:
    total = memory['args'] + memory['out'] + memory['temp'] - memory['alias']
    print(
      f'| memory_analysis of (a) at per-device batch {args.memory_batch} ({args.dtype}) | {total / GiB:.2f} GiB '
      f'(args {memory["args"] / GiB:.2f} + out {memory["out"] / GiB:.2f} + temp {memory["temp"] / GiB:.2f} '
      f'- aliased {memory["alias"] / GiB:.2f}; compiled in {memory["compile_s"]:.0f} s, not run); '
      f'{"fits" if total < 16 * GiB else "does NOT fit"} a 16 GiB TPU v5e chip |'
    )
  print(f'| peak RSS of the process at end | {machine_load.peak_rss_gib():.2f} GiB |')
  print(f'| load average at end | {machine_load.load()} |')
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
