"""The distillation step, as one program or as one program per layer shape.

One step runs the frozen teacher once on the batch and trains every cell of the selected blocks
against its block outputs (student block k reads teacher block k-1; block 1 reads the image
through its own stem). Each device samples its own path per cell; gradients and BatchNorm
statistics are averaged over devices. Both forms compute the same update:

- 'step': `distill_step`, the whole step one program (every op of every cell in it).
- 'layer': `LayerwiseStep`, a chain of small programs run from Python: the teacher, the paths, then
  per cell the forward of each link (stem, DS, layer: a `lax.switch` over the candidate ops), the
  loss, and for each link its backward (which recomputes the sampled op's forward, like
  distill.remat='op') and its part of the block's optimizer step. Links with the same modules and
  input shape share their compiled programs, so the compile cost grows with the number of distinct
  layer shapes rather than with the number of layers, cells and ops. On one device (in all), cells
  (independent given the teacher's outputs) are launched from `concurrent_cells` threads, and with
  `sampled_op_programs` each link's sampled op, read back to the host, runs as a forward of its own
  that keeps its gradient's residuals and a backward from them: no switch, nothing recomputed
  (`link_programs.py` holds each link's programs in both forms).

Given a `program_cache.ProgramCache`, either form stores its compiled programs, described by the
arguments that built them, and a rerun or resumed run loads them instead of tracing again.
"""

from __future__ import annotations

from collections.abc import Callable
import concurrent.futures
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from dna_jax import images as images_lib
from dna_jax import link_programs
from dna_jax import parallel
from dna_jax import program_cache
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax.models import supernet

Array = jax.Array
BlockState = supernet_store.BlockState
Blocks = tuple[tuple[int, tuple[supernet.SupernetCell, ...]], ...]  # (block index, its cells)

PROGRAMS = ('step', 'layer')


def check_programs(programs: str, key: str = 'programs') -> None:
  """A clear error naming `key` unless `programs` is one of PROGRAMS."""
  if programs not in PROGRAMS:
    raise ValueError(f'{key} must be one of {", ".join(PROGRAMS)}, got {programs!r}')


def _check_whole_number(value: Any, key: str, least: int) -> None:
  """A clear error naming `key` unless `value` is a whole number of at least `least`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f'{key} must be a whole number of at least {least}, got {value!r}')


def check_compile_threads(compile_threads: Any, key: str = 'compile_threads') -> None:
  _check_whole_number(compile_threads, key, 0)


def check_concurrent_cells(concurrent_cells: Any, key: str = 'concurrent_cells') -> None:
  _check_whole_number(concurrent_cells, key, 1)


def distill_losses(student: Array, target: Array) -> tuple[Array, Array]:
  """MSE (the training loss) and DNA's relative L1: mean |S - T| / std(T)."""
  student, target = student.astype(jnp.float32), target.astype(jnp.float32)
  mse = jnp.mean(jnp.square(student - target))
  rel_l1 = jnp.mean(jnp.abs(student - target)) / (jnp.std(target) + 1e-8)
  return mse, rel_l1


def create_learning_rate_fn(base_lr: float, decay: float, steps_per_epoch: int, offset: int = 1) -> optax.Schedule:
  """DNA's schedule: base_lr * decay ** (epoch + offset), staircase, epochs counted from 0.

  offset 1 is the authors': their StepLR steps once before the first epoch trains, so epoch 1 already
  runs at base_lr * decay.
  """
  return optax.exponential_decay(base_lr * decay**offset, steps_per_epoch, decay, staircase=True)


def sample_path(rng: Array, step: Array, cell: space_lib.Cell, sampling: str) -> Array:
  """One op per layer of `cell` ('uniform' or 'fair' sampling); pinned layers keep their op."""
  if sampling == 'uniform':
    path = supernet.random_path(jax.random.fold_in(rng, step), cell.layers)
  else:
    path = supernet.fair_path(rng, step, cell.layers)
  return supernet.with_pins(path, cell)


def cell_path_rng(seed: int, block_index: int, cell_index: int) -> Array:
  """The key of one cell's paths on this device (inside a step)."""
  path_rng = jax.random.fold_in(jax.random.PRNGKey(seed), parallel.device_index())
  return jax.random.fold_in(path_rng, 64 * block_index + cell_index)


def teacher_and_student_inputs(
  images: Array,
  teacher_variables: Any,
  teacher_apply: Callable[[Any, Array], dict[str, Array]],
  student_normalization: tuple[str, str] | None,
) -> tuple[dict[str, Array], Array]:
  """The teacher's block outputs (no gradient) and the images as block 1 of the student reads them.

  The teacher reads the images as the data holds them; the student reads them converted by
  `student_normalization` (data's, model's), as the child net will.
  """
  features = lax.stop_gradient(teacher_apply(teacher_variables, images))
  if student_normalization is not None:
    images = images_lib.normalize(images.astype(jnp.float32), *student_normalization)
  return features, images


def update_block(
  state: BlockState, grads: Any, batch_stats: Any, optimizer: optax.GradientTransformation
) -> tuple[BlockState, Array]:
  """The block's optimizer step from device-averaged gradients; returns the new state and gradient norm."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = BlockState(state.step + 1, optax.apply_updates(state.params, updates), batch_stats, opt_state)
  return new_state, optax.tree.norm(grads)


# ----------------------------------------------------------------------------- one program


def distill_step(
  states: dict[str, BlockState],
  batch: dict[str, Array],
  teacher_variables: Any,
  *,
  blocks: Blocks,
  teacher_apply: Callable[[Any, Array], dict[str, Array]],
  optimizers: dict[str, optax.GradientTransformation],
  sampling: str,
  seed: int,
  student_normalization: tuple[str, str] | None = None,
) -> tuple[dict[str, BlockState], dict[str, Array]]:
  """One per-device step over all selected blocks, as one program."""
  features, images = teacher_and_student_inputs(batch['image'], teacher_variables, teacher_apply, student_normalization)
  step = next(iter(states.values())).step
  # Varying like the statistics that the sampled branch computes from this device's batch.
  batch_stats = parallel.varying({name: state.batch_stats for name, state in states.items()})

  def loss_fn(params):
    total, aux = 0.0, {}
    for k, cells in blocks:
      name = f'block{k + 1}'
      inputs = images if k == 0 else features[f'block{k}']
      target = features[name]
      for c, cell in enumerate(cells):
        cname = f'cell{c}'
        path = sample_path(cell_path_rng(seed, k, c), step, cell.cell, sampling)
        output, new_stats = cell.apply(
          {'params': params[name][cname], 'batch_stats': batch_stats[name][cname]}, inputs, path, True
        )
        mse, rel_l1 = distill_losses(output, target)
        total = total + mse
        aux[(name, cname)] = (new_stats, mse, rel_l1)
    return total, aux

  params = {name: state.params for name, state in states.items()}
  grads, aux = jax.grad(loss_fn, has_aux=True)(parallel.varying(params))
  grads = lax.pmean(grads, parallel.AXIS)
  new_states, metrics = {}, {}
  for name, state in states.items():
    batch_stats = {cname: lax.pmean(aux[(name, cname)][0], parallel.AXIS) for cname in state.params}
    new_states[name], metrics[f'{name}/grad_norm'] = update_block(state, grads[name], batch_stats, optimizers[name])
    for cname in state.params:
      metrics[f'{name}/{cname}/mse'] = aux[(name, cname)][1]
      metrics[f'{name}/{cname}/rel_l1'] = aux[(name, cname)][2]
  return new_states, lax.pmean(metrics, parallel.AXIS)


# ----------------------------------------------------------------------------- one program per layer shape


def _loss_and_grad(output: Array, target: Array) -> tuple[Array, Array, Array]:
  """Per device: d MSE / d output, and the MSE and relative L1 averaged over devices."""
  (mse, rel_l1), d_output = jax.value_and_grad(distill_losses, has_aux=True)(output, target)
  return d_output, lax.pmean(mse, parallel.AXIS), lax.pmean(rel_l1, parallel.AXIS)


@functools.cache
def _loss_program(mode: str, cache: program_cache.ProgramCache | None = None) -> Callable[..., Any]:
  fn = parallel.per_device(_loss_and_grad, mode, (True, True), (True, False, False))
  return program_cache.wrap(cache, fn, f'distill_loss{(mode,)!r}')


def _run_program(program: Callable[..., Any], *args: Any) -> Any:
  return program(*args)


class LayerwiseStep:
  """`distill_step`'s update as a chain of small programs (see the module docstring).

  Called like the data-parallel one-program step: (replicated states, sharded batch, teacher
  variables) -> (replicated states, replicated metrics). Every process launches the same programs
  in the same order, as the collectives in them require.

  With `concurrent_cells` > 1 and a single device in all, the cells' program chains are launched
  from that many threads: a profile of the 15-cell ImageNet step on 2 CPU cores had a kernel running
  93% of the step but each of XLA:CPU's two threads busy only 55% (most kernels of these small
  programs run on one thread), so a second cell's programs fill the idle core (README, Performance).
  Each program computes what it did in sequence (the result is bit-identical, tested). With several
  devices or processes the cells run one after another: every process must launch the programs
  with collectives in one order, and a multi-device program launched from two threads might reach
  its devices in different orders (not tried).
  """

  def __init__(
    self,
    blocks: Blocks,
    teacher_apply: Callable[[Any, Array], dict[str, Array]],
    optimizers: dict[str, optax.GradientTransformation],
    sampling: str,
    seed: int,
    mode: str,
    student_normalization: tuple[str, str] | None = None,
    cache: program_cache.ProgramCache | None = None,
    described: tuple[str, dict[str, str]] = ('', {}),
    concurrent_cells: int = 1,
    compile_threads: int = 0,
    sampled_op_programs: bool = False,
  ):
    """`described`: descriptions (for `cache`) of the inputs program and of each block's update.
    `compile_threads` > 0: before the first step, trace every program from the arguments' shapes while
    that many other threads compile them (under shard_map in one process; see `_compile_ahead`)."""
    check_concurrent_cells(concurrent_cells)
    check_compile_threads(compile_threads)
    if cache is not None and (not described[0] or set(described[1]) != set(optimizers)):
      raise ValueError(
        f'A program cache needs a description of the inputs program and of each of {sorted(optimizers)}.'
      )
    self.blocks, self.mode, self.cache = blocks, mode, cache
    self.by_op = sampled_op_programs and link_programs.usable(tuple(cell for _, cells in blocks for cell in cells))
    threads = concurrent_cells if jax.device_count() == 1 else 1
    self.cell_threads = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None
    self.compiled = False  # the first call runs the cells in turn: two threads would compile a program twice
    # pmap recompiles what was compiled ahead (tried); the stored programs are one process's.
    self.compile_threads = compile_threads if mode == 'shard_map' and jax.process_count() == 1 else 0

    def inputs(batch, teacher_variables, step):
      features, images = teacher_and_student_inputs(
        batch['image'], teacher_variables, teacher_apply, student_normalization
      )
      # One (1,)-shaped op per layer and device, so that links of cells of any length share programs.
      ops = {}
      for k, cells in blocks:
        for c, cell in enumerate(cells):
          path = sample_path(cell_path_rng(seed, k, c), step, cell.cell, sampling)
          ops[f'block{k + 1}/cell{c}'] = tuple(path[l][None] for l in range(cell.cell.layers))
      return features, images, ops

    self.inputs = program_cache.wrap(
      cache, parallel.per_device(inputs, mode, (True, False, False), (True, True, True)), described[0]
    )
    # Blocks with one optimizer and description share their links' update programs.
    self.optimizers = {name: (optimizer, described[1].get(name, '')) for name, optimizer in optimizers.items()}

  def train_cell(
    self,
    call: Callable[..., Any],
    cell: supernet.SupernetCell,
    block: str,
    cell_name: str,
    state: BlockState,
    inputs: Array,
    target: Array,
    ops: tuple[Array, ...],
  ) -> tuple[Any, Any, dict[str, Any], list[Array], Array, Array]:
    """One cell of `block` along its sampled path: forward, loss, backward and each link's update,
    each program run as `call(program, *arguments)`.

    Returns the cell's new parameters and statistics, each link's new optimizer state, the links'
    squared gradient norms, the MSE and the relative L1.
    """
    params, stats = state.params[cell_name], state.batch_stats[cell_name]
    optimizer, what = self.optimizers[block]
    update = link_programs.update_program(optimizer, what, self.mode, self.cache)
    links = cell.units()
    link_ops = [ops[max(l, 0)] for _, _, l in links]  # the stem and DS ignore theirs
    forward, backward = (
      (link_programs.sampled_op_forward, link_programs.sampled_op_backward)
      if self.by_op
      else (link_programs.switch_forward, link_programs.switch_backward)
    )
    x, kept, new_stats = inputs, [], {}
    for (name, modules, _), op in zip(links, link_ops):
      x, new_stats[name], link_kept = forward(call, self.mode, self.cache, modules, params[name], stats[name], x, op)
      kept.append(link_kept)
    d_x, mse, rel_l1 = call(_loss_program(self.mode, self.cache), x, target)
    new_params, opt_states, squared_norms = {}, {}, []
    for i in reversed(range(len(links))):
      name, modules, _ = links[i]
      results = backward(
        call, self.mode, self.cache, modules, i > 0, params[name], stats[name], kept[i], link_ops[i], d_x
      )
      d_x = results[-1]
      opt_state = supernet_store.link_opt_state(state.opt_state, state.params, cell_name, name)
      new_params[name], opt_states[name], squared_norm = call(update, params[name], opt_state, results[0])
      squared_norms.append(squared_norm)
    return new_params, new_stats, opt_states, squared_norms, mse, rel_l1

  def __call__(
    self, states: dict[str, BlockState], batch: dict[str, Array], teacher_variables: Any
  ) -> tuple[dict[str, BlockState], dict[str, Array]]:
    if not self.compiled and self.compile_threads:
      self._compile_ahead(states, batch, teacher_variables)
    return self.run_programs(_run_program, states, batch, teacher_variables)

  def _compile_ahead(self, states: dict[str, BlockState], batch: dict[str, Array], teacher_variables: Any) -> None:
    """Every program of the step, traced and lowered on this thread from the arguments' shapes while
    `compile_threads` other threads compile them (stored programs are loaded instead).

    The 15-cell ImageNet step's first step (82 programs, 2-core Intel Xeon, one cold run each, back to
    back): 104.4 s compiled in turn, 96.2 s with one compile thread, 88.3 s with two (92.2 and 92.3 s in two
    more runs; peak RSS 5.4 GiB).
    """
    with concurrent.futures.ThreadPoolExecutor(self.compile_threads, thread_name_prefix='compile') as compile_in:
      ahead = program_cache.AheadRun(compile_in)
      self.run_programs(ahead, *program_cache.shapes_of((states, batch, teacher_variables)))
      for compiled in ahead.pending:
        compiled.result()  # an error compiling surfaces here

  def run_programs(
    self, call: Callable[..., Any], states: dict[str, BlockState], batch: dict[str, Array], teacher_variables: Any
  ) -> tuple[dict[str, BlockState], dict[str, Array]]:
    """The step, each program run as `call(program, *arguments)` (benchmarks time the programs this way)."""
    features, images, ops = call(self.inputs, batch, teacher_variables, next(iter(states.values())).step)
    if self.by_op and all(isinstance(op, jax.Array) for op in jax.tree.leaves(ops)):
      ops = jax.device_get(ops)  # the sampled ops, on the host in one transfer (shapes when compiling ahead)
    cells = {}  # (block, cell) -> its results (`train_cell`), or a future of them
    for k, block_cells in self.blocks:
      name = f'block{k + 1}'
      for c, cell in enumerate(block_cells):
        arguments = (
          cell,
          name,
          f'cell{c}',
          states[name],
          images if k == 0 else features[f'block{k}'],
          features[name],
          ops[f'{name}/cell{c}'],
        )
        if self.cell_threads is None or not self.compiled or call is not _run_program:
          cells[name, c] = self.train_cell(call, *arguments)
        else:
          cells[name, c] = self.cell_threads.submit(self.train_cell, call, *arguments)
    new_states, metrics = {}, {}
    for k, block_cells in self.blocks:
      name = f'block{k + 1}'
      params, stats, opt_states, squared_norms = {}, {}, {}, []
      for c in range(len(block_cells)):
        result = cells[name, c]
        if isinstance(result, concurrent.futures.Future):
          result = result.result()
        cname = f'cell{c}'
        params[cname], stats[cname], cell_opt_states, cell_norms, mse, rel_l1 = result
        opt_states.update({(cname, link): part for link, part in cell_opt_states.items()})
        squared_norms += cell_norms
        metrics[f'{name}/{cname}/mse'], metrics[f'{name}/{cname}/rel_l1'] = mse, rel_l1
      step, metrics[f'{name}/grad_norm'] = call(
        link_programs.step_program(self.mode, self.cache), states[name].step, tuple(squared_norms)
      )
      opt_state = supernet_store.block_opt_state(states[name].opt_state, states[name].params, opt_states)
      new_states[name] = BlockState(step, params, stats, opt_state)
    self.compiled = self.compiled or call is _run_program
    return new_states, metrics


@functools.cache
def parallel_distill_step(
  blocks: Blocks,
  teacher_model: Any,
  train_mode_bn: bool,
  learning_rates: tuple[tuple[str, float], ...],
  lr_decay: float,
  lr_decay_offset: int,
  steps_per_epoch: int,
  weight_decay: float,
  sampling: str,
  seed: int,
  mode: str,
  student_normalization: tuple[str, str] | None = None,
  programs: str = 'step',
  cache: program_cache.ProgramCache | None = None,
  concurrent_cells: int = 1,
  compile_threads: int = 0,
  sampled_op_programs: bool = False,
) -> Callable[..., Any]:
  """The device-parallel distillation step, built once per configuration (so compiled once).

  With `cache`, its programs are stored and loaded across processes (module docstring).
  `concurrent_cells`: with programs='layer' on one device of one process, how many cells run at once.
  `compile_threads`: with programs='layer', how many threads compile its programs while the next are
  traced, before the first step (0: each compiles when first called; `LayerwiseStep`).
  `sampled_op_programs`: with programs='layer' on one device, each link's sampled op as a forward that
  keeps its residuals and a backward from them (on XLA:CPU only where their memory mappings fit).
  """
  check_programs(programs)
  teacher_part = (blocks, teacher_model, train_mode_bn, sampling, seed, mode, student_normalization)
  schedule = (lr_decay, lr_decay_offset, steps_per_epoch, weight_decay)
  teacher_apply = functools.partial(
    teacher_lib.teacher_features, teacher_model, up_to=max(k for k, _ in blocks) + 1, train_mode_bn=train_mode_bn
  )
  # One optimizer per learning rate: blocks that share it share their programs ('layer').
  by_rate = {
    lr: supernet_store.block_optimizer(
      create_learning_rate_fn(lr, lr_decay, steps_per_epoch, lr_decay_offset), weight_decay
    )
    for lr in dict(learning_rates).values()
  }
  optimizers = {name: by_rate[lr] for name, lr in learning_rates}
  if programs == 'layer':
    described = (
      f'distill_inputs{teacher_part!r}',
      {name: f'distill_update{(lr, *schedule, mode)!r}' for name, lr in learning_rates},
    )
    return LayerwiseStep(
      blocks,
      teacher_apply,
      optimizers,
      sampling,
      seed,
      mode,
      student_normalization,
      cache,
      described,
      concurrent_cells,
      compile_threads,
      sampled_op_programs,
    )
  step_fn = functools.partial(
    distill_step,
    blocks=blocks,
    teacher_apply=teacher_apply,
    optimizers=optimizers,
    sampling=sampling,
    seed=seed,
    student_normalization=student_normalization,
  )
  step = parallel.data_parallel(step_fn, mode, num_broadcast=1)
  return program_cache.wrap(cache, step, f'distill_step{(teacher_part, learning_rates, schedule)!r}')
