"""Rating speed: the prefix-sharing vmapped evaluator (`cell_rating.rate_cell`) against one path at a time.

  PYTHONPATH=. python benchmarks/rate_paths.py [--batch 32] [--calib_batch 32] [--chunk_size 216]
      [--naive_paths 20] [--repeats 2] [--five_layer pieces|full|skip] [--rating_images 10000]
      [--skip_teacher] [--dtype float32|bfloat16] [--peak_gflops 157]

Cells: block 5 of `space.default_imagenet_space()` (input: teacher block 4, 14x14x224; output: the
teacher's 7x7x384): the 4-layer 4@192 cell (1296 paths) and the 5-layer 5@192 cell (7776 paths, the
cell the machine notes' targets name). Random supernet variables, random input activations of the
right shapes (speed does not depend on values), --dtype activations (model.dtype: float32 by default,
bfloat16 on accelerators), one device. Every path is recalibrated
(BatchNorm statistics from the --calib_batch calibration inputs fed through that path) and scored on
--batch rating inputs. The rate stage recalibrates each cell once (`cell_rating.calibrate_cell`) and
reuses the statistics for every rating batch; the naive loop recalibrates per path per batch.

Measured, compile excluded (each compiled function is called once first; compile time is stated):
  ours:  `cell_rating.calibrate_cell` (once per cell) and `cell_rating.rate_cell` (per batch) on the
         whole 4@192 cell (median of --repeats calls). On 5@192 (--five_layer pieces, the default)
         their pieces are timed, each on real inputs: the first-layer calls, the second-layer calls
         under one first-layer op and --subtrees vmapped subtree calls, composed into exactly the calls
         they make (--five_layer full times them on the whole cell instead). Per path per image, the
         calibration is spread over the ceil(--rating_images / --batch) batches; the row "recalibrated
         for every batch" adds it to every batch instead.
  naive: one path at a time, the authors' way: recalibrate then evaluate the path layer by layer
         (`cell_rating.naive_path_errors`' computation, jitted once with the path as a traced argument,
         one lax.switch per layer), called per path on --naive_paths random paths, mean per path; the
         whole cell is that times its path count (extrapolated).
  teacher: EfficientNet-B7 (random weights, inference BN) forward up to block 5 on --batch images at
         224 px (what rating block 5 needs), and up to block 6 (what rating every block needs). The
         naive loop re-runs it per path (the issue's "authors' way"); ours runs it once per batch for
         every cell of every block.
Projection to the whole default space (23,005 paths, block 6 pinned) on --rating_images images: ceil(images/batch)
batches x (sum over the 15 cells of rate_cell's time per batch + the teacher up to block 6) + every
cell's calibration once. Cells not measured are scaled from the measured 4@192 times by their analytic
multiply-accumulates over the prefix tree (sum over layers l of 6**l x the 6 ops' MACs, x batch images
for rating, x calib_batch images for calibration).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine_load
from benchmarks import random_variables
from dna_jax import cell_rating
from dna_jax import costs
from dna_jax import host_memory
from dna_jax import space as space_lib
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.models import layers
from dna_jax.models import supernet

NUM_OPS = space_lib.NUM_OPS
BLOCK = 4  # block 5 (0-based index)


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def tree_macs(cell: supernet.SupernetCell, size: int) -> int:
  """Per-image MACs of rating every path of `cell` as a prefix tree (every op of layer l on 6**l prefixes)."""
  layer_shapes = [cell.layer_shape(l) for l in range(cell.cell.layers)]
  stem_macs, per_layer = costs.supernet_cell_macs(layer_shapes, size, cell.stem)
  return stem_macs + sum(NUM_OPS**l * sum(per_op) for l, per_op in enumerate(per_layer))


def naive_fn(cell: supernet.SupernetCell):
  """One path: recalibrate + evaluate layer by layer (naive_path_errors' computation), path traced."""

  def one_path(variables, path, calib, inputs, target, mask):
    for l in range(cell.cell.layers):
      branches = [functools.partial(cell_rating._op_pair, cell, variables, l, j) for j in range(NUM_OPS)]  # pylint: disable=protected-access
      calib, inputs = lax.switch(path[l], branches, calib, inputs)
    return cell_rating.path_errors(inputs[None], target, mask)

  return jax.jit(one_path)


def measure_naive(cell, variables, data, num_paths: int, seed: int) -> dict[str, float]:
  fn = naive_fn(cell)
  rng = np.random.default_rng(seed)
  paths = [jnp.asarray(rng.integers(0, NUM_OPS, cell.cell.layers), jnp.int32) for _ in range(num_paths + 1)]
  compile_s, _ = timed(fn, variables, paths[0], *data)
  times = [timed(fn, variables, p, *data)[0] for p in paths[1:]]
  return {
    'compile_s': compile_s - statistics.median(times),
    'path_s': statistics.mean(times),
    'median_s': statistics.median(times),
    'n': num_paths,
    'load': machine_load.load(),
  }


def calibration_arrays(calibration: cell_rating.Calibration) -> tuple:
  return calibration.stem, calibration.nodes, calibration.subtrees


def measure_rate_cell(cell, variables, data, chunk: int, repeats: int) -> dict[str, float]:
  """calibrate_cell once (its time: once per cell) and rate_cell per batch, each the median of `repeats`."""
  calib, inputs, target, mask = data
  calibrate = lambda: calibration_arrays(cell_rating.calibrate_cell(cell, variables, calib, chunk))
  first_calib, _ = timed(calibrate)
  calib_s = statistics.median(timed(calibrate)[0] for _ in range(repeats))
  calibration = cell_rating.calibrate_cell(cell, variables, calib, chunk)
  run = lambda: cell_rating.rate_cell(cell, variables, calibration, inputs, target, mask)
  first, _ = timed(run)
  steady = statistics.median(timed(run)[0] for _ in range(repeats))
  return {
    'compile_s': first - steady + first_calib - calib_s,
    'cell_s': steady,
    'calib_s': calib_s,
    'how': f'measured, whole cell, median of {repeats}',
    'load': machine_load.load(),
  }


def measure_pieces(cell, variables, data, chunk: int, subtrees: int) -> dict[str, float]:
  """calibrate_cell's and rate_cell's calls on a cell with lead levels, each kind timed on real inputs, composed."""
  calib, inputs, target, mask = data
  layers_ = cell.cell.layers
  d = cell_rating.trailing_levels(layers_, chunk)
  lead = layers_ - d
  compile_s = 0.0
  level_inputs = [(calib, inputs)]
  apply_times, calib_times = [], []
  for level in range(lead):
    c, x = level_inputs[-1]
    calibrates = [cell_rating.compiled('calibrate_op', cell, None, level, j) for j in range(NUM_OPS)]
    applies = [cell_rating.compiled('apply_op', cell, None, level, j) for j in range(NUM_OPS)]
    first = [timed(f, variables, c) for f in calibrates]  # compile + run
    calib_steady = [timed(f, variables, c)[0] for f in calibrates]
    stats = [out[1] for _, out in first]
    first_apply = [timed(f, variables, s, x) for f, s in zip(applies, stats)]
    apply_steady = [timed(f, variables, s, x)[0] for f, s in zip(applies, stats)]
    compile_s += sum(t for t, _ in first) - sum(calib_steady) + sum(t for t, _ in first_apply) - sum(apply_steady)
    calib_times.append(statistics.mean(calib_steady))
    apply_times.append(statistics.mean(apply_steady))
    level_inputs.append((first[0][1][0], first_apply[0][1]))
  c, x = level_inputs[-1]
  sub_calib = cell_rating.compiled('calibrate_subtree', cell, None, lead)
  first, stats = timed(sub_calib, variables, c)
  sub_calib_s = statistics.mean(timed(sub_calib, variables, c)[0] for _ in range(subtrees))
  sub = cell_rating.compiled('subtree', cell, None, lead, 1)
  first_sub, _ = timed(sub, variables, stats, x, target, mask)
  sub_s = statistics.mean(timed(sub, variables, stats, x, target, mask)[0] for _ in range(subtrees))
  compile_s += first - sub_calib_s + first_sub - sub_s
  compose = lambda times, subtree_s: (
    sum(NUM_OPS ** (l + 1) * t for l, t in enumerate(times)) + NUM_OPS**lead * subtree_s
  )
  parts = ' + '.join(f'{NUM_OPS ** (l + 1)} x {t:.3f}' for l, t in enumerate(apply_times))
  return {
    'compile_s': compile_s,
    'cell_s': compose(apply_times, sub_s),
    'calib_s': compose(calib_times, sub_calib_s),
    'load': machine_load.load(),
    'how': f'pieces measured, composed: {parts} + {NUM_OPS**lead} x {sub_s:.3f} s (subtree, mean of {subtrees})',
  }


def measure_adaptive(cell, variables, data, chunk: int, fractions: list[float], groups: int, seed: int):
  """rate_cell on random survivor sets (the rest of the rating after adaptive pruning): s per cell per batch."""
  calib, inputs, target, mask = data
  calibration = cell_rating.calibrate_cell(cell, variables, calib, chunk)
  rng = np.random.default_rng(seed)
  out = {}
  for fraction in fractions:
    survivors = rng.random(cell.cell.num_paths) < fraction
    run = functools.partial(
      cell_rating.rate_cell, cell, variables, calibration, inputs, target, mask, num_groups=groups, survivors=survivors
    )
    timed(run)  # compiles the per-op and per-leaf programs
    out[fraction] = statistics.median(timed(run)[0] for _ in range(2))
  return out


def subtree_temp_bytes(cell, variables, data, chunk: int) -> int:
  """XLA's temp bytes of one vmapped subtree call of rate_cell at `chunk` (lowered and compiled, not run)."""
  calib, inputs, target, mask = data
  lead = cell.cell.layers - cell_rating.trailing_levels(cell.cell.layers, chunk)
  level_shape = lambda x: jax.ShapeDtypeStruct(
    x.shape[:1] + (x.shape[1] // 2, x.shape[2] // 2, cell.cell.width), x.dtype
  )
  c, x = (calib, inputs) if lead == 0 else (level_shape(calib), level_shape(inputs))
  stats = jax.eval_shape(functools.partial(cell_rating.subtree_stats, cell, lead), variables, c)
  fn = jax.jit(functools.partial(cell_rating.subtree_errors, cell, lead, 1))
  return fn.lower(variables, stats, x, target, mask).compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32, help='rating images per batch')
  parser.add_argument('--calib_batch', type=int, default=32, help='calibration images (BN recalibration)')
  parser.add_argument('--chunk_size', type=int, default=216)
  parser.add_argument('--naive_paths', type=int, default=20, help='paths timed in the naive loop (per cell)')
  parser.add_argument('--repeats', type=int, default=2, help='timed rate_cell calls on the 4-layer cell')
  parser.add_argument('--subtrees', type=int, default=2, help='timed subtree calls (--five_layer pieces)')
  parser.add_argument('--five_layer', choices=('pieces', 'full', 'skip'), default='pieces')
  parser.add_argument('--rating_images', type=int, default=10000)
  parser.add_argument('--skip_teacher', action='store_true')
  parser.add_argument('--dtype', choices=tuple(layers.ACTIVATION_DTYPES), default='float32', help='activation dtype')
  parser.add_argument(
    '--survivors',
    default='0.05,0.1,0.25',
    help="adaptive rating: fractions of the 4@192 cell's paths left after pruning, timed ('' to skip)",
  )
  parser.add_argument('--adaptive_examples', type=int, default=1000, help='images every path is rated on first')
  parser.add_argument(
    '--memory_chunks',
    default='216',
    help="chunk sizes whose subtree call memory_analysis is reported for 4@192 (besides --chunk_size; '' to skip)",
  )
  parser.add_argument(
    '--peak_gflops',
    type=float,
    default=157.0,
    help='device peak in GFLOP/s (default: 157, fp32 of the 2-core CPU this project is tested on)',
  )
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(
    f'device: {device.platform} {device.device_kind}; jax {jax.__version__}; batch {args.batch}, calib '
    f'{args.calib_batch}, chunk {args.chunk_size}, {args.dtype}; load average at start {machine_load.load()}',
    flush=True,
  )

  space = space_lib.default_imagenet_space()
  conventions = layers.Conventions(dtype=layers.ACTIVATION_DTYPES[args.dtype])
  all_cells = supernet.supernet_cells(space, conventions=conventions)
  sizes = space_lib.supernet_input_sizes(space, 224, 2)
  in_size, in_ch = sizes[BLOCK], all_cells[BLOCK][0].in_channels
  out_size = space_lib.output_size(in_size, 3, 2, 'tf_same')
  out_ch = all_cells[BLOCK][0].out_channels
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  data = (
    normal(args.calib_batch, in_size, in_size, in_ch),
    normal(args.batch, in_size, in_size, in_ch),
    normal(args.batch, out_size, out_size, out_ch),
    jnp.ones((args.batch,), jnp.float32),
  )

  chosen = {'4@192': all_cells[BLOCK][0]}
  if args.five_layer != 'skip':
    chosen['5@192'] = all_cells[BLOCK][2]
  results, memory_lines = {}, []
  for name, cell in chosen.items():
    rcell = cell_rating.for_rating(cell, None)
    variables = jax.jit(cell.init)(jax.random.key(1), jnp.zeros((1, in_size, in_size, in_ch)))
    naive = measure_naive(rcell, variables, data, args.naive_paths, seed=len(results))
    print(
      f'  {name} naive: {naive["path_s"]:.4f} s/path (median {naive["median_s"]:.4f}), compile '
      f'{naive["compile_s"]:.1f} s, load {naive["load"]}',
      flush=True,
    )
    if cell.cell.layers <= 4 or args.five_layer == 'full':
      ours = measure_rate_cell(rcell, variables, data, args.chunk_size, args.repeats)
    else:
      ours = measure_pieces(rcell, variables, data, args.chunk_size, args.subtrees)
    print(
      f'  {name} rate_cell: {ours["cell_s"]:.2f} s/cell/batch ({ours["how"]}), calibrate_cell '
      f'{ours["calib_s"]:.2f} s once per cell, compile {ours["compile_s"]:.1f} s, load {ours["load"]}',
      flush=True,
    )
    if name == '4@192' and args.survivors:
      fractions = [float(f) for f in args.survivors.split(',')]
      adaptive = measure_adaptive(rcell, variables, data, args.chunk_size, fractions, 16, seed=3)
      for fraction, seconds in adaptive.items():
        print(f'  4@192 adaptive, {100 * fraction:.0f}% of paths left: {seconds:.2f} s/cell/batch', flush=True)
    results[name] = (cell, naive, ours)
    if name == '4@192' and args.memory_chunks is not None:
      chunks = sorted({args.chunk_size} | {int(c) for c in args.memory_chunks.split(',') if c.strip()}, reverse=True)
      for chunk in chunks:
        temp = subtree_temp_bytes(rcell, variables, data, chunk)
        memory_lines.append(
          f'4@192 subtree call at chunk {chunk} ({6 ** cell_rating.trailing_levels(4, chunk)} paths vmapped), '
          f'batch {args.batch} + calib {args.calib_batch}: XLA temp {temp / 2**30:.2f} GiB '
          '(memory_analysis, compiled not run)'
        )
        print(f'  {memory_lines[-1]}', flush=True)
    del variables

  teacher = {}
  if not args.skip_teacher:
    model = efficientnet.variant('b7', conventions=conventions)
    images = jnp.asarray(rng.uniform(0, 255, (args.batch, 224, 224, 3)), jnp.float32)
    tvars = random_variables.teacher_variables(model)
    for up_to in (BLOCK + 1, len(space.blocks)):
      fn = jax.jit(lambda v, x, up_to=up_to: teacher_lib.teacher_features(model, v, x, up_to=up_to))
      first, _ = timed(fn, tvars, images)
      times = [timed(fn, tvars, images)[0] for _ in range(2)]
      teacher[up_to] = statistics.median(times)
      print(
        f'  teacher B7 up_to={up_to}, batch {args.batch}: {teacher[up_to]:.3f} s (compile '
        f'{first - teacher[up_to]:.1f} s), load {machine_load.load()}',
        flush=True,
      )
  t5, t6 = teacher.get(BLOCK + 1, 0.0), teacher.get(len(space.blocks), 0.0)

  b, calib_b = args.batch, args.calib_batch
  batches = math.ceil(args.rating_images / b)
  print()
  print(
    f'device: {device.platform} {device.device_kind}; block-5 cells (14x14x224 -> 7x7x384), {args.dtype}; '
    f'{b} rating + {calib_b} calibration images per path; {args.rating_images} rating images = {batches} batches; '
    'compile excluded'
  )
  print(
    '| cell | paths | method | what is timed | s per cell per batch | ms / path / image | paths/s (per batch) '
    '| GFLOP/s (analytic) | compile s | load 1/5/15 |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  summary = []
  for name, (cell, naive, ours) in results.items():
    paths = cell.cell.num_paths
    naive_cell = naive['path_s'] * paths
    # Recalibrated once per cell, reused for every batch: its cost spread over the rating's batches.
    amortized = ours['cell_s'] + ours['calib_s'] / batches
    ours_gflops = 2 * tree_macs(cell, in_size) * (b + calib_b / batches) / amortized / 1e9
    print(
      f'| {name} | {paths} | rate_cell (prefix tree + vmap, statistics recalibrated once) | {ours["how"]}; '
      f'calibrate_cell {ours["calib_s"]:.2f} s once, / {batches} batches | {amortized:.2f} | '
      f'{1e3 * amortized / paths / b:.4f} | {paths / amortized:.1f} | {ours_gflops:.1f} '
      f'({100 * ours_gflops / args.peak_gflops:.0f}% of peak) | {ours["compile_s"]:.1f} | {ours["load"]} |'
    )
    every = ours['cell_s'] + ours['calib_s']
    print(
      f'| {name} | {paths} | the same, recalibrated for every batch | rate_cell + calibrate_cell per batch | '
      f'{every:.2f} | {1e3 * every / paths / b:.4f} | {paths / every:.1f} | - | - | - |'
    )
    print(
      f'| {name} | {paths} | naive, one path at a time | {naive["n"]} random paths measured, x {paths} '
      f'extrapolated | {naive_cell:.1f} | {1e3 * naive["path_s"] / b:.3f} | {1 / naive["path_s"]:.2f} | - | '
      f'{naive["compile_s"]:.1f} | {naive["load"]} |'
    )
    line = (
      f'{name}: rate_cell is {naive_cell / amortized:.1f}x faster per path per image than the naive loop '
      f'(student only; {naive_cell / every:.1f}x if it recalibrated for every batch)'
    )
    if teacher:
      with_t = (naive['path_s'] + t5) * paths
      print(
        f'| {name} | {paths} | naive + teacher B7 up_to=5 re-run per path | naive + {t5:.2f} s per path | '
        f'{with_t:.1f} | {1e3 * (naive["path_s"] + t5) / b:.3f} | {1 / (naive["path_s"] + t5):.3f} | - | - | - |'
      )
      line += f'; with the teacher re-run per path vs once per batch for this cell: {with_t / (amortized + t5):.0f}x'
    summary.append(line)

  # Projection to the whole default space: per batch, every cell's rate_cell; once, every cell's calibration.
  measured = {name: (ours['cell_s'], ours['calib_s']) for name, (_, _, ours) in results.items()}
  ref_cell, _, ref = results['4@192']
  s_per_mac = ref['cell_s'] / (tree_macs(ref_cell, in_size) * b)
  calib_s_per_mac = ref['calib_s'] / (tree_macs(ref_cell, in_size) * calib_b)
  per_batch, calibration = 0.0, 0.0
  for k, cells in enumerate(all_cells):
    for cell in cells:
      key = cell.cell.name if k == BLOCK else None
      if key in measured:
        per_batch += measured[key][0]
        calibration += measured[key][1]
      else:
        per_batch += tree_macs(cell, sizes[k]) * b * s_per_mac
        calibration += tree_macs(cell, sizes[k]) * calib_b * calib_s_per_mac
  num_paths = sum(c.cell.num_paths for cs in all_cells for c in cs)
  total_s = batches * (per_batch + t6) + calibration
  print()
  for line in summary:
    print(f'- {line}')
  print(
    f'- whole default space ({num_paths:,} paths, 15 cells) on {args.rating_images} images, projected: '
    f'{batches} batches x ({per_batch:.1f} s rate_cell over all cells [block-5 4@192'
    f'{" and 5@192" if "5@192" in measured else ""} measured, the rest MAC-scaled from 4@192] '
    f'+ {t6:.2f} s teacher up_to=6) + {calibration:.0f} s calibrating every cell once = {total_s / 3600:.1f} h '
    f'({"teacher not measured" if not teacher else "teacher included"}); the naive loop, student only: '
    f'{results["4@192"][1]["path_s"] / b * num_paths * args.rating_images / 3600:.0f} h'
  )
  if args.survivors:
    first = min(1.0, args.adaptive_examples / args.rating_images)
    ref_s = ref['cell_s']
    for fraction, seconds in adaptive.items():
      ratio = first + (1 - first) * seconds / ref_s
      naive_ms = 1e3 * results['4@192'][1]['path_s'] / b
      ours_ms = 1e3 * (ref_s * ratio + ref['calib_s'] / batches) / ref_cell.cell.num_paths / b
      print(
        f'- adaptive rating, {100 * fraction:.0f}% of paths left after the first {args.adaptive_examples} images: '
        f'4@192 rating batches cost {ratio:.2f}x the exhaustive ones ({ours_ms:.3f} ms per path per image with '
        f'the calibration, {naive_ms / ours_ms:.1f}x the naive loop); whole space projected '
        f'{(batches * (per_batch * ratio + t6) + calibration) / 3600:.1f} h (every cell assumed to keep that fraction)'
      )
  for line in memory_lines:
    print(f'- {line}')
  print(f'- peak RSS of the process: {machine_load.peak_rss_gib():.2f} GiB; load average at end {machine_load.load()}')
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
