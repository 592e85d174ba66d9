"""The distillation step as one program per layer shape against one program: compile, memory, speed.

  PYTHONPATH=. python benchmarks/distill_programs.py [--space imagenet|small] [--batch 8] [--steps 3]
      [--parallel shard_map|pmap] [--blocks 3] [--one_program] [--cache_dir DIR] [--program_cache_dir DIR]
      [--profile_dir DIR] [--concurrent_cells 2] [--per_tap_baseline] [--compile_threads 2]
      [--dtype float32|bfloat16] [--peak_gflops 157] [--program_times] [--torch_student [--torch_teacher]] [--progress]
      [--sampled_op_programs 0|1] [--recompute_baseline]

Builds the step of every cell of every block (`distill_steps.parallel_distill_step`, as training
does; --blocks: only those) with distill.programs='layer' and measures: the first step's wall time (it traces and
compiles every program: the teacher and paths, each distinct link forward, backward and optimizer
update, the loss, each block's step count and gradient norm), the number of programs compiled in it
(and, after the tables, their tracing, lowering and XLA compile seconds by traced function), the
process's peak RSS after it, and the median of --steps further steps. --one_program also builds distill.programs='step' (the whole
step one program) in the same process, afterwards, and measures the same (its first step is its
compile); for the ImageNet space its XLA:CPU compile took over 16 GiB of host memory on the 24 GiB
test machine, so it is off by default there. --cache_dir turns on JAX's persistent compilation
cache as the stages do (programs that took >= 1 s to compile): run twice to measure a restart.
--program_cache_dir stores the compiled step programs themselves (`program_cache.ProgramCache`, as the
distill stage does): a second run loads them without tracing. --profile_dir writes a profiler trace of
one more step of the per-layer programs (open it in TensorBoard's profile plugin or Perfetto; on CPU,
XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true adds every kernel to it). --concurrent_cells N (on one
device) also times the per-layer step with N cells at once (`distill.concurrent_cells`), its steps
alternating with the one-cell-at-a-time step's in the same run, and checks that both give the same
update bit for bit. --per_tap_baseline also builds the per-layer step with each depthwise kernel gradient
summed by one reduction per tap (`tap_sum_baselines.per_tap`, as before `layers.tap_sums` summed all
taps in one reduction) in the same process, afterwards, with no program cache, and measures the same.

--program_times: afterwards, --steps more steps with each program waited for before the next starts:
seconds per step by traced function (forward, backward, update, teacher and paths, ...), against the
step run as training runs it (programs queued ahead, one cell at a time).

--torch_student: afterwards, in the same run, the per-layer step's student part (its median step, with
--concurrent_cells cells at once as training runs it, less the median of its teacher-and-paths program
alone, the two timed in alternation) against `torch_student.py`'s PyTorch stand-in for
the authors' student part at the same batch and blocks (torch's default threads), and their ratio.
--torch_teacher (with --torch_student): the stand-in also runs the teacher before each cell, from the
image up to the cell's block with BatchNorm in training mode, as the authors' loop does; prints their
whole step against the JAX step (target: at least 10x).

--sampled_op_programs 0|1 (default 1, as distill.sampled_op_programs): on one device, each link's sampled
op as a forward of its own that keeps its residuals and a backward from them (1), or the switch over the
ops whose backward recomputes it (0). --recompute_baseline: afterwards, the step both ways, alternating,
with --concurrent_cells cells at once; their medians, ratio and the largest difference of their updates
(both in one process take more than Linux's default 65,530 memory mappings on XLA:CPU: raise
vm.max_map_count first).

--compile_threads N (default 2, as distill.compile_threads): the per-layer step traces its programs ahead
of the first step while N threads compile them (0: each compiles when first called).

--space imagenet: `space.default_imagenet_space()` (15 cells), random-weight EfficientNet-B7 teacher,
224 px, batch 8. --space small: the demo space against the 'tiny' teacher at 32 px, batch 128.
--dtype: the activations' dtype (model.dtype; bfloat16 on accelerators), parameters float32.

Model FLOPs utilisation: the analytic FLOPs of a step (the teacher's forward, 2 x its multiply-accumulates,
and every cell's forward and backward along a uniformly sampled path, 6 x the multiply-accumulates of the
mean op of each layer: the expectation over the sampled paths) over the median step time, against
--peak_gflops (default 157, fp32 of the 2-core Zen3 CPU; an H100's or H200's dense bf16 is about 990,000).
The device's peak bytes in use are printed where the backend reports them (GPU, TPU).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import distill_step as step_benchmark
from benchmarks import machine_load
from benchmarks import random_variables
from benchmarks import tap_sum_baselines
from benchmarks import torch_student
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import parallel
from dna_jax import program_cache
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax.models import efficientnet
from dna_jax.models import layers
from dna_jax.models import supernet

GiB = 1024**3


# Phases of JAX's compile log (jax_log_compiles) and how their messages begin.
PHASES = {
  'tracing': 'Finished tracing',
  'lowering': 'Finished jaxpr to MLIR',
  'compiling': 'Finished XLA compilation',
}


# The traced function's name in each phase's message: "f for jit", "jit(f)".
PROGRAM_NAME = re.compile(r'(?:tracing |conversion |compilation of )(?:jit\()?([^ ()]+)')


class CompileCounter(logging.Handler):
  """Counts XLA compilations and sums the seconds JAX logs for each phase (jax_log_compiles), in all
  and by the name of the traced function (`by_program`: name -> compilations, then each phase's seconds)."""

  def __init__(self, progress: bool = False):
    super().__init__()
    self.count = 0
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.by_program: dict[str, list[float]] = {}
    self.progress = progress  # print a line per compilation (what a run cut off by a time limit got to)
    self.started = time.perf_counter()

  def emit(self, record: logging.LogRecord) -> None:
    message = record.getMessage()
    for i, (phase, prefix) in enumerate(PHASES.items()):
      match = re.search(r' in ([0-9.]+) sec', message)
      if message.startswith(prefix) and match:
        self.seconds[phase] += float(match.group(1))
        self.count += phase == 'compiling'
        name = PROGRAM_NAME.search(message)
        row = self.by_program.setdefault(name.group(1) if name else '?', [0, 0.0, 0.0, 0.0])
        row[0] += phase == 'compiling'
        row[1 + i] += float(match.group(1))
        if self.progress and phase == 'compiling':
          print(
            f'    [{time.perf_counter() - self.started:.0f} s] compiled #{self.count} {name.group(1) if name else "?"} '
            f'in {float(match.group(1)):.1f} s',
            flush=True,
          )


def count_compiles(progress: bool = False) -> CompileCounter:
  """Turns on JAX's compile log and returns a handler that counts and times it (printing a line per
  compilation with `progress`; JAX's own messages are not printed)."""
  counter = CompileCounter(progress)
  jax_logger = logging.getLogger('jax')
  jax_logger.addHandler(counter)
  jax_logger.setLevel(logging.DEBUG)
  jax_logger.propagate = False  # counted, not printed
  jax.config.update('jax_log_compiles', True)
  return counter


def clear_program_builders() -> None:
  """Forgets `distill_steps`' memoized programs and builders, so that the next step is traced afresh."""
  for builder in vars(distill_steps).values():
    if hasattr(builder, 'cache_clear'):
      builder.cache_clear()


def measure(step_fn, states, batch, teacher_variables, steps: int, counter: CompileCounter) -> dict[str, float]:
  before, seconds_before = counter.count, dict(counter.seconds)
  by_program_before = {name: list(row) for name, row in counter.by_program.items()}
  start = time.perf_counter()
  new_states, metrics = step_fn(states, batch, teacher_variables)
  jax.block_until_ready((new_states, metrics))
  first_s = time.perf_counter() - start
  compiled = counter.count - before
  phases = {phase: counter.seconds[phase] - seconds_before[phase] for phase in counter.seconds}
  by_program = {}
  for name, row in counter.by_program.items():
    earlier = by_program_before.get(name, [0, 0.0, 0.0, 0.0])
    if row != earlier:
      by_program[name] = [now - then for now, then in zip(row, earlier)]
  rss = machine_load.peak_rss_gib()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    new_states, metrics = step_fn(new_states, batch, teacher_variables)
    jax.block_until_ready((new_states, metrics))
    times.append(time.perf_counter() - start)
  return {
    'first_s': first_s,
    'compiled': compiled,
    'phases': phases,
    'by_program': by_program,
    'rss': rss,
    'step_s': statistics.median(times),
    'load': machine_load.load(),
    'device_peak_gib': (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use', float('nan')) / GiB,
  }


def build_step(blocks, model, learning_rates, args, programs: str, cache, concurrent_cells: int, by_op=None):
  """The distillation step as training builds it (memoized on its arguments), with this benchmark's settings
  (`by_op`: distill.sampled_op_programs, default --sampled_op_programs)."""
  return distill_steps.parallel_distill_step(
    blocks,
    model,
    False,
    learning_rates,
    0.9,
    1,
    1000,
    1e-4,
    'uniform',
    0,
    args.parallel,
    None,
    programs,
    cache,
    concurrent_cells,
    args.compile_threads,
    bool(args.sampled_op_programs) if by_op is None else by_op,
  )


def alternate_steps(steps: dict[Any, Any], states, batch, teacher_variables, count: int):
  """`count` rounds of each of `steps` once, in turn, on the same arguments: the last outputs and the
  seconds of every call, by key."""
  outputs, times = {}, {key: [] for key in steps}
  for _ in range(count):
    for key, step in steps.items():
      start = time.perf_counter()
      outputs[key] = jax.block_until_ready(step(states, batch, teacher_variables))
      times[key].append(time.perf_counter() - start)
  return outputs, times


def largest_difference(a: Any, b: Any) -> float:
  """The largest absolute difference between corresponding leaves of two pytrees of arrays."""
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def compare_concurrent_cells(blocks, model, learning_rates, args, cache, states, batch, teacher_variables) -> None:
  """Steps with cells one at a time and --concurrent_cells at once, alternating; their medians.

  The one-at-a-time step is the one `main` measured (the builder is memoized on its arguments).
  """
  steps = {n: build_step(blocks, model, learning_rates, args, 'layer', cache, n) for n in (1, args.concurrent_cells)}
  # The first call compiles the second step and runs its cells in turn; the second runs them as training
  # does. With one round only, both steps' first two timed calls were 0.3-1.2 s slower than the rest
  # (15-cell ImageNet step, 2-core AMD EPYC: 2.95, 3.21, 2.28, 2.24, 2.23 s).
  outputs, _ = alternate_steps(steps, states, batch, teacher_variables, 2)
  timed, times = alternate_steps(steps, states, batch, teacher_variables, args.steps)
  outputs.update(timed)
  largest = largest_difference(outputs[1], outputs[args.concurrent_cells])
  same = largest == 0.0  # exact in float64 for these float32 and integer leaves (False if any is NaN)
  print(f'\n| cells at once | s/step (median of {args.steps}, alternating) | all steps | load |')
  print('|---|---|---|---|')
  for n, measured in times.items():
    median = statistics.median(measured)
    print(f'| {n} | {median:.3f} | {", ".join(f"{t:.2f}" for t in measured)} | {machine_load.load()} |')
  ratio = statistics.median(times[1]) / statistics.median(times[args.concurrent_cells])
  print(
    f'\n{args.concurrent_cells} cells at once: {ratio:.2f}x (same run); the same update bit for bit: {same} '
    f'(largest difference {largest:.2e})'
  )


def compare_sampled_op_programs(blocks, model, learning_rates, args, cache, states, batch, teacher_variables) -> None:
  """Steps with distill.sampled_op_programs on and off, alternating, --concurrent_cells cells at once; their
  medians and the largest difference of their updates."""
  cells_at_once = max(args.concurrent_cells, 1)
  steps = {
    by_op: build_step(blocks, model, learning_rates, args, 'layer', cache, cells_at_once, by_op)
    for by_op in (False, True)
  }
  if not steps[True].by_op:
    print('\nthe sampled-op step fell back to the switch (too few memory mappings left): raise vm.max_map_count')
    return
  # The first call compiles and runs the cells in turn; the second as training runs them.
  outputs, _ = alternate_steps(steps, states, batch, teacher_variables, 2)
  timed, times = alternate_steps(steps, states, batch, teacher_variables, args.steps)
  outputs.update(timed)
  largest = largest_difference(outputs[False][0], outputs[True][0])
  print(
    f"\n| each link's sampled op ({cells_at_once} cell(s) at once) | s/step (median of {args.steps}, alternating) "
    '| all steps | load |'
  )
  print('|---|---|---|---|')
  labels = {False: 'one program per layer shape, recomputed in the backward', True: 'its own programs, residuals kept'}
  for by_op, measured in times.items():
    print(
      f'| {labels[by_op]} | {statistics.median(measured):.3f} | {", ".join(f"{t:.2f}" for t in measured)} '
      f'| {machine_load.load()} |'
    )
  ratio = statistics.median(times[False]) / statistics.median(times[True])
  print(
    f'\nresiduals kept / recomputed: {ratio:.2f}x faster (same run); largest difference of the new states {largest:.2e}'
  )


def program_name(program: Any) -> str:
  """The traced function's name of a jitted program (a stored program's description otherwise)."""
  text = repr(getattr(program, '__wrapped__', program))
  found = re.search(r'function ([\w.<>]+)', text)
  return found.group(1).split('.')[-1] if found else text[:40]


def time_programs(step_fn, states, batch, teacher_variables, steps: int) -> None:
  """Each program of the per-layer step run alone (waiting for it before the next starts): seconds per step
  by traced function, median over `steps`, against the step run as training runs it."""
  per_step, calls, whole = [], {}, []
  for _ in range(steps):
    spent: dict[str, float] = {}

    def blocking(program, *arguments, spent=spent):
      start = time.perf_counter()
      out = jax.block_until_ready(program(*arguments))
      name = program_name(program)
      spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
      calls[name] = calls.get(name, 0) + 1
      return out

    jax.block_until_ready(step_fn.run_programs(blocking, states, batch, teacher_variables))
    per_step.append(spent)
    start = time.perf_counter()
    jax.block_until_ready(step_fn(states, batch, teacher_variables))
    whole.append(time.perf_counter() - start)
  medians = {name: statistics.median(s[name] for s in per_step) for name in per_step[0]}
  total = sum(medians.values())
  print(f'\n| program (run alone, one at a time) | calls per step | s per step (median of {steps}) | share |')
  print('|---|---|---|---|')
  for name, seconds in sorted(medians.items(), key=lambda item: -item[1]):
    print(f'| {name} | {calls[name] // steps} | {seconds:.3f} | {100 * seconds / total:.0f}% |')
  print(
    f'| all, one at a time | | {total:.3f} | |\n| the step as training runs it | | {statistics.median(whole):.3f} | |'
  )


def compare_with_torch(
  step_fn,
  states,
  batch,
  teacher_variables,
  space,
  block_ids,
  sizes: tuple[int, int, int],
  steps: int,
  cells_at_once: int,
  teacher_model: efficientnet.EfficientNet | None = None,
) -> None:
  """The per-layer step's student part (its step less its teacher-and-paths program) against the
  PyTorch stand-in for the authors' student part (`torch_student.py`), same batch, same run; with
  `teacher_model`, also the whole step against the stand-in's whole step (the teacher re-run before
  each cell, as the authors' loop does).

  `sizes`: (batch, image size, stem stride); `step_fn` runs `cells_at_once` cells at once.
  """
  count = next(iter(states.values())).step
  jax.block_until_ready(step_fn(states, batch, teacher_variables))
  step_times, teacher_times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step_fn(states, batch, teacher_variables))
    step_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(step_fn.inputs(batch, teacher_variables, count))
    teacher_times.append(time.perf_counter() - start)
  step_s, teacher_s = statistics.median(step_times), statistics.median(teacher_times)
  torch_result = torch_student.student_step_seconds(
    space, *sizes, steps, block_ids=block_ids, teacher_model=teacher_model
  )
  student_s, torch_s = step_s - teacher_s, torch_result['step_s']
  print(
    f'\n| student part (every cell fwd + bwd + Adam) | s/step (median of {steps}) | load |\n|---|---|---|\n'
    f'| JAX, per layer shape{" with sampled-op programs" if getattr(step_fn, "by_op", False) else ""}, '
    f'{cells_at_once} cell(s) at once: step {step_s:.3f} less teacher and paths '
    f'{teacher_s:.3f} | {student_s:.3f} | {machine_load.load()} |\n'
    f"| PyTorch stand-in for the authors' (torch_student.py, {torch_student.torch.get_num_threads()} threads) | "
    f'{torch_s:.3f} | {machine_load.load()} |'
  )
  print(
    f'\nstudent part, PyTorch / JAX: {torch_s / student_s:.2f}x (same run; above 1: JAX faster; target: at least 1)'
  )
  if teacher_model is not None:
    full_s = torch_result['full_step_s']
    print(
      f"\nwhole step: JAX {step_s:.3f} s; the PyTorch stand-in for the authors' {full_s:.3f} s (its teacher "
      f'{torch_result["teacher_s"]:.3f} s, run before each cell); PyTorch / JAX: {full_s / step_s:.2f}x '
      f'(same run; target: at least 10); load {machine_load.load()}'
    )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--space', choices=('imagenet', 'small'), default='imagenet')
  parser.add_argument('--batch', type=int, default=0, help='default: 8 (imagenet) or 128 (small)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps after the first (median)')
  parser.add_argument('--parallel', choices=parallel.MODES, default='shard_map')
  parser.add_argument('--one_program', action='store_true', help="also measure distill.programs='step'")
  parser.add_argument('--blocks', default='', help="only these blocks, e.g. '3' or '2,3' (default: all)")
  parser.add_argument('--cache_dir', default='', help="JAX's persistent compilation cache (default: off)")
  parser.add_argument('--program_cache_dir', default='', help='stored executables (default: off)')
  parser.add_argument('--profile_dir', default='', help='trace one more step here (default: off)')
  parser.add_argument('--concurrent_cells', type=int, default=1, help='also time N cells at once (default: off)')
  parser.add_argument(
    '--compile_threads', type=int, default=2, help='threads compiling while the next programs are traced (0: off)'
  )
  parser.add_argument(
    '--per_tap_baseline', action='store_true', help='also measure one reduction per depthwise kernel tap (as before)'
  )
  parser.add_argument('--dtype', choices=tuple(layers.ACTIVATION_DTYPES), default='float32', help='activation dtype')
  parser.add_argument('--peak_gflops', type=float, default=157.0, help='device peak for the FLOPs utilisation')
  parser.add_argument('--program_times', action='store_true', help='also time each program of the step alone')
  parser.add_argument(
    '--torch_student', action='store_true', help="also time the PyTorch stand-in for the authors' student part"
  )
  parser.add_argument(
    '--torch_teacher',
    action='store_true',
    help="with --torch_student: the stand-in re-runs the teacher before each cell (the authors' whole step)",
  )
  parser.add_argument(
    '--sampled_op_programs', type=int, choices=(0, 1), default=1, help='as distill.sampled_op_programs (default 1)'
  )
  parser.add_argument(
    '--recompute_baseline',
    action='store_true',
    help='also time the step with and without --sampled_op_programs, alternating',
  )
  parser.add_argument('--progress', action='store_true', help='print a line per compiled program, with the time')
  args = parser.parse_args(argv)
  if args.torch_teacher and not args.torch_student:
    parser.error('--torch_teacher needs --torch_student')
  if args.cache_dir:
    program_cache.enable_compilation_cache(args.cache_dir)
  cache = program_cache.ProgramCache(args.program_cache_dir) if args.program_cache_dir else None
  counter = count_compiles(args.progress)

  space, teacher_name, batch_size, image, stem_stride = step_benchmark.benchmark_space(args.space, args.batch)
  conventions = layers.Conventions(dtype=layers.ACTIVATION_DTYPES[args.dtype])
  cells = supernet.supernet_cells(space, conventions=conventions, stem_stride=stem_stride)
  block_ids = space_lib.parse_block_numbers(args.blocks, len(cells), '--blocks')
  blocks = tuple((k, tuple(cells[k])) for k in block_ids)
  links = sum(len(cell.units()) for _, block_cells in blocks for cell in block_cells)
  device = jax.devices()[0]
  print(
    f'device: {device.platform} {device.device_kind} x{jax.device_count()}; jax {jax.__version__}; space '
    f'{args.space} ({len(blocks)} blocks, {sum(len(c) for _, c in blocks)} cells, {links} links); teacher '
    f'{teacher_name}; batch {batch_size}, {image} px, {args.dtype}; {args.parallel}; cache {args.cache_dir or "off"}; '
    f'load {machine_load.load()}',
    flush=True,
  )
  model = efficientnet.variant(teacher_name, conventions=conventions)
  # Analytic FLOPs per step: the teacher's forward up to the last block trained, each trained cell's
  # forward + backward (3 x forward) along the mean op of each layer.
  up_to = max(block_ids) + 1
  step_flops = batch_size * (
    2 * step_benchmark.teacher_macs(model, image, up_to)
    + 6 * step_benchmark.analytic_student_macs(space, cells, image, stem_stride, block_ids)
  )
  rng = np.random.default_rng(0)
  per_device = parallel.check_global_batch(batch_size, '--batch')
  images = rng.uniform(0, 1, (jax.local_device_count(), per_device, image, image, 3)).astype(np.float32)
  batch = parallel.shard_batch({'image': images}, args.parallel)
  start = time.perf_counter()
  teacher_variables = random_variables.teacher_variables(model)
  jax.block_until_ready(teacher_variables)
  print(f'teacher variables (random, made on the host) {time.perf_counter() - start:.1f} s', flush=True)
  sizes = space_lib.supernet_input_sizes(space, image, stem_stride)
  learning_rates = tuple((f'block{k + 1}', 0.005) for k, _ in blocks)
  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.005, 0.9, 1000), 1e-4)
  start = time.perf_counter()
  supernet.compile_link_inits(
    [(cell, sizes[k]) for k, block_cells in blocks for cell in block_cells], jax.random.key(0), args.compile_threads
  )
  host_states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.key(k), block_cells, sizes[k], optimizer)
    for k, block_cells in blocks
  }
  states = parallel.replicate(parallel.host_copy(host_states), args.parallel)
  print(
    f'supernet init {time.perf_counter() - start:.1f} s (compiles so far {counter.count}); '
    f'peak RSS {machine_load.peak_rss_gib():.2f} GiB',
    flush=True,
  )

  results = {}
  variants = [('layer', cache, contextlib.nullcontext)]
  variants += [('step', cache, contextlib.nullcontext)] if args.one_program else []
  variants += [('layer, one reduction per tap', None, tap_sum_baselines.per_tap)] if args.per_tap_baseline else []
  for programs, variant_cache, tracing in variants:
    baseline = tracing is not contextlib.nullcontext
    if baseline:
      clear_program_builders()
    with tracing():
      step_fn = build_step(blocks, model, learning_rates, args, programs.split(',')[0], variant_cache, 1)
      results[programs] = measure(step_fn, states, batch, teacher_variables, args.steps, counter)
    if baseline:
      clear_program_builders()  # what is built next traces the code's formulation again
    r = results[programs]
    by_op = ' with sampled-op programs' if getattr(step_fn, 'by_op', False) else ''
    print(
      f"  programs='{programs}'{by_op}: first step {r['first_s']:.1f} s ({r['compiled']} programs compiled; "
      + ', '.join(f'{phase} {seconds:.1f} s' for phase, seconds in r['phases'].items())
      + '), '
      + f'then {r["step_s"]:.3f} s/step; peak RSS after the first step {r["rss"]:.2f} GiB; load {r["load"]}',
      flush=True,
    )
    if args.profile_dir and programs == 'layer':
      # With --concurrent_cells, the step that launches that many cells at once (as training does); its
      # first call runs the cells in turn, so it runs once before the profiled call.
      profiled = build_step(blocks, model, learning_rates, args, 'layer', cache, max(args.concurrent_cells, 1))
      if profiled is not step_fn:
        jax.block_until_ready(profiled(states, batch, teacher_variables))
      with jax.profiler.trace(args.profile_dir):
        jax.block_until_ready(profiled(states, batch, teacher_variables))
      print(f'  profiled one step in {args.profile_dir}', flush=True)
  print()
  print(
    f'| programs | first step s (traces + compiles) | programs compiled | JAX tracing / lowering / XLA compile s | '
    f's/step (median of {args.steps}) | '
    'img/s | analytic TFLOP/s | % of peak (MFU) | peak RSS after the first step GiB | device peak GiB | load 1/5/15 min |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for programs, r in results.items():
    tflops = step_flops / r['step_s'] / 1e12
    print(
      f'| {programs} | {r["first_s"]:.1f} | {r["compiled"]} | '
      + ' / '.join(f'{seconds:.1f}' for seconds in r['phases'].values())
      + f' | {r["step_s"]:.3f} | {batch_size / r["step_s"]:.1f} | {tflops:.2f} | '
      f'{100 * tflops * 1e3 / args.peak_gflops:.1f} | {r["rss"]:.2f} | {r["device_peak_gib"]:.2f} | {r["load"]} |'
    )
  print(
    f'\nanalytic FLOPs per step: {step_flops / 1e12:.3f} TFLOP (teacher up to block {up_to} forward, every cell '
    f'forward + backward along the mean op of each layer; batch {batch_size}); peak {args.peak_gflops:g} GFLOP/s'
  )
  for programs, r in results.items():
    print(f"\nprograms='{programs}', first step by traced function:\n")
    print('| function | programs compiled | JAX tracing / lowering / XLA compile s |\n|---|---|---|')
    for name, (count, *seconds) in sorted(r['by_program'].items(), key=lambda item: -sum(item[1][1:])):
      print(f'| {name} | {count:.0f} | ' + ' / '.join(f'{s:.1f}' for s in seconds) + ' |')
  if args.per_tap_baseline:
    layer, per_tap = results['layer'], results['layer, one reduction per tap']
    print(
      f'\none reduction per tap / all taps in one reduction: first step {per_tap["first_s"] / layer["first_s"]:.2f}x, '
      f'step time {per_tap["step_s"] / layer["step_s"]:.2f}x (same run)'
    )
  if args.concurrent_cells > 1:
    compare_concurrent_cells(blocks, model, learning_rates, args, cache, states, batch, teacher_variables)
  if args.recompute_baseline:
    compare_sampled_op_programs(blocks, model, learning_rates, args, cache, states, batch, teacher_variables)
  if args.program_times:
    time_programs(
      build_step(blocks, model, learning_rates, args, 'layer', cache, 1), states, batch, teacher_variables, args.steps
    )
  if args.torch_student:
    cells_at_once = max(args.concurrent_cells, 1)
    step_fn = build_step(blocks, model, learning_rates, args, 'layer', cache, cells_at_once)
    sizes = (batch_size, image, stem_stride)
    teacher_model = model if args.torch_teacher else None
    compare_with_torch(
      step_fn, states, batch, teacher_variables, space, block_ids, sizes, args.steps, cells_at_once, teacher_model
    )
  if 'step' in results:
    layer, step = results['layer'], results['step']
    print(
      f'\none program / per layer shape: first step {step["first_s"] / layer["first_s"]:.2f}x, '
      f'step time {step["step_s"] / layer["step_s"]:.2f}x (same run)'
    )
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
