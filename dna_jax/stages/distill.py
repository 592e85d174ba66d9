"""The distill stage: every cell of every block trained against the teacher in one data-parallel run.

Each step (distill_steps.py) runs the frozen teacher once on the batch and trains all selected
cells of all blocks against its block outputs, as one program or as one program per layer shape
(distill.programs). Each block is checkpointed on its own (supernet_store.py), so blocks can be
trained, resumed and rated independently. A fresh run of one process traces and compiles the step in
a second thread while the supernets are initialised (distill.compile_while_initialising).

Writes WORKDIR/distill/block_K/ (Orbax), distill/tb/ (TensorBoard), distill/history.json and
distill/loss_curves.png.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import concurrent.futures
import dataclasses
import itertools
import json
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from dna_jax import checkpoints
from dna_jax import distill_steps
from dna_jax import files
from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import program_cache
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import layers
from dna_jax.models import supernet

BlockState = supernet_store.BlockState


def parse_learning_rates(text: str, num_blocks: int) -> list[float]:
  """One learning rate per block from 'LR' or 'LR1,LR2,...'."""
  rates = [float(r) for r in str(text).split(',') if r.strip()]
  if len(rates) == 1:
    rates = rates * num_blocks
  if len(rates) != num_blocks:
    raise ValueError(
      f'distill.learning_rates has {len(rates)} values but the space has {num_blocks} blocks '
      '(give one value, or one per block)'
    )
  return rates


def check_finite(history: list[tuple[int, dict[str, Any]]]) -> None:
  """Raises naming block, cell and step at the first non-finite loss."""
  for step, metrics in history:
    for key, value in metrics.items():
      if key.endswith('/mse') and not np.isfinite(value):
        block, cell = key.split('/')[:2]
        raise FloatingPointError(
          f'non-finite distillation loss in {block} {cell} at step {step}; '
          'the last good checkpoint is kept. Lower distill.learning_rates or check the data.'
        )


# ----------------------------------------------------------------------------- the train loop


@dataclasses.dataclass
class _Training:
  """What the loop's helpers share: settings, every block's manager, the log and the preemption flag."""

  dcfg: ml_collections.ConfigDict
  total_steps: int
  steps_per_epoch: int
  rates: list[float]
  managers: dict[str, Any]
  elapsed: dict[str, float]  # seconds trained before this run, per block
  writer: Any
  history: list[tuple[int, dict[str, float]]]
  preemption: checkpoints.Preemption
  started: float = dataclasses.field(default_factory=time.time)


def _flush(training: _Training, pending: list[tuple[int, Any]], block_names: list[str], since: float) -> None:
  """Fetches the pending metrics, checks them, logs the last step's and appends it to the history."""
  fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
  pending.clear()
  check_finite(fetched)
  if not fetched:
    return
  step, last = fetched[-1]
  epoch = (step - 1) // training.steps_per_epoch
  scalars = {**last, 'images_per_second': training.dcfg.batch_size * len(fetched) / max(time.time() - since, 1e-9)}
  for name in block_names:
    decays = epoch + training.dcfg.lr_decay_offset
    scalars[f'{name}/learning_rate'] = training.rates[int(name[5:]) - 1] * training.dcfg.lr_decay**decays
  training.writer.write_scalars(step, scalars)
  training.history.append((step, last))


def _save(training: _Training, states: dict[str, BlockState], step: int) -> None:
  for name, state in states.items():
    meta = {
      'step': step,
      'elapsed_seconds': training.elapsed[name] + time.time() - training.started,
      'total_steps': training.total_steps,
    }
    supernet_store.save_block(training.managers[name], state, meta)


def _train_group(
  training: _Training,
  states: dict[str, BlockState],
  p_step: Callable[..., Any],
  batches: Iterator[dict[str, np.ndarray]],
  teacher_variables: Any,
  start: int,
) -> dict[str, BlockState]:
  """Trains blocks that stand at the same step `start` up to the last step (or a preemption)."""
  dcfg = training.dcfg
  hooks = [periodic_actions.ReportProgress(num_train_steps=training.total_steps, writer=training.writer)]
  if dcfg.profile_steps and jax.process_index() == 0:
    logdir = str(training.managers[next(iter(training.managers))].directory.parent)
    hooks.append(periodic_actions.Profile(num_profile_steps=dcfg.profile_steps, logdir=logdir))
  pending: list[tuple[int, Any]] = []
  since = time.time()
  saved = set()
  states = parallel.replicate(parallel.host_copy(states), dcfg.parallel)
  for step in range(start + 1, training.total_steps + 1):
    batch = next(batches)
    with jax.profiler.StepTraceAnnotation('distill', step_num=step):
      states, metrics = p_step(states, parallel.shard_batch(batch, dcfg.parallel), teacher_variables)
    pending.append((step, metrics))
    parallel.wait_for_steps_in_flight(pending)
    if step == start + 1:  # where a short run's time goes: tracing and compiling are all in this step
      jax.block_until_ready(metrics)
      logging.info(
        'First step (traces and compiles the step unless that was done during initialisation, or loads it '
        'compiled) took %.1f s.',
        time.time() - since,
      )
    for hook in hooks:
      hook(step)
    preempted = training.preemption.check(step, *training.managers.values())
    last = step == training.total_steps or preempted
    if step % dcfg.log_every_steps == 0 or step % dcfg.checkpoint_every_steps == 0 or last:
      _flush(training, pending, list(states), since)
      since = time.time()
    if (step % dcfg.checkpoint_every_steps == 0 or last) and step not in saved:
      saved.add(step)
      _save(training, states, step)
    if preempted:
      logging.warning('Preemption at step %d: every block saved; stopping.', step)
      break
  return states


def _in_background(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
  """`fn(*args)` in a daemon thread (an error exit does not wait for it); its future."""
  future: concurrent.futures.Future = concurrent.futures.Future()

  def run() -> None:
    try:
      future.set_result(fn(*args))
    except BaseException as e:
      future.set_exception(e)

  threading.Thread(target=run, name='compile_distill_step', daemon=True).start()
  return future


def _compile_step(
  p_step: Callable[..., Any],
  blocks: dict[str, tuple[Any, int, Any]],
  batch: dict[str, np.ndarray],
  teacher_variables: Any,
  mode: str,
) -> float:
  """Runs `p_step` once on all-zero block states (the result is dropped), so that it is traced and
  compiled (or loaded) while the caller initialises the real states; returns the seconds it took.

  `blocks`: name -> (cells, input size, optimizer) of each block the step trains. Initialising and
  compiling each leave part of 2 CPU cores idle, so they partly overlap: on the demo's stage 16 of
  the 37 s a full overlap would save (README, Performance).
  """
  began = time.time()
  zeros = {
    name: jax.tree.map(
      lambda leaf: np.zeros(leaf.shape, leaf.dtype), supernet_store.abstract_block_state(cells, size, optimizer)
    )
    for name, (cells, size, optimizer) in blocks.items()
  }
  jax.block_until_ready(p_step(parallel.replicate(zeros, mode), parallel.shard_batch(batch, mode), teacher_variables))
  return time.time() - began


def train_blocks(
  config: ml_collections.ConfigDict,
  workdir: str,
  teacher_model: Any,
  teacher_variables: Any,
  space: space_lib.SearchSpace,
  data: Callable[[int], Iterator[dict[str, np.ndarray]]],
  steps_per_epoch: int,
) -> dict[str, Any]:
  """Trains (or resumes) the selected blocks; returns the final per-cell losses.

  `data(start_step)` yields host batches (local_devices, per_device, ...) from that step on.
  """
  dcfg = config.distill
  conventions = layers.conventions_from_config(config.model)
  all_cells = supernet.supernet_cells(
    space, conventions=conventions, stem_stride=config.space.stem_stride, remat=dcfg.remat
  )
  rates = parse_learning_rates(dcfg.learning_rates, len(space.blocks))
  total_steps = dcfg.epochs * steps_per_epoch
  sizes = space_lib.supernet_input_sizes(space, config.data.image_size, config.space.stem_stride)
  paths = workdir_lib.Workdir(workdir)
  selected = space_lib.parse_block_numbers(dcfg.blocks, len(space.blocks), 'distill.blocks')
  optimizers = {
    k: supernet_store.block_optimizer(
      distill_steps.create_learning_rate_fn(rates[k], dcfg.lr_decay, steps_per_epoch, dcfg.lr_decay_offset),
      dcfg.weight_decay,
    )
    for k in selected
  }
  managers = {f'block{k + 1}': supernet_store.block_manager(workdir, k, dcfg.keep_checkpoints) for k in selected}

  def build_step(block_ids: list[int]) -> Callable[..., Any]:
    return distill_steps.parallel_distill_step(
      tuple((k, tuple(all_cells[k])) for k in block_ids),
      teacher_model,
      config.teacher.train_mode_bn,
      tuple((f'block{k + 1}', rates[k]) for k in block_ids),
      dcfg.lr_decay,
      dcfg.lr_decay_offset,
      steps_per_epoch,
      dcfg.weight_decay,
      dcfg.sampling,
      config.seed,
      dcfg.parallel,
      supernet_store.student_normalization(config),
      dcfg.programs,
      program_cache.from_config(config),
      dcfg.concurrent_cells,
      dcfg.compile_threads,
      dcfg.sampled_op_programs,
    )

  batches: dict[int, Iterator[dict[str, np.ndarray]]] = {}  # data streams opened early, by start step
  compiling = None
  fresh = not any(manager.all_steps() for manager in managers.values())
  if fresh and total_steps > 0 and dcfg.compile_while_initialising and jax.process_count() == 1:
    stream = data(0)
    first = next(stream)
    batches[0] = itertools.chain([first], stream)
    blocks = {f'block{k + 1}': (all_cells[k], sizes[k], optimizers[k]) for k in selected}
    compiling = _in_background(
      _compile_step, build_step(sorted(selected)), blocks, first, teacher_variables, dcfg.parallel
    )
  states, elapsed = {}, {}
  rng = jax.random.PRNGKey(config.seed)
  fresh_cells = [
    (cell, sizes[k]) for k in selected if not managers[f'block{k + 1}'].all_steps() for cell in all_cells[k]
  ]
  if fresh_cells and dcfg.compile_threads >= 2:
    began = time.time()
    count = supernet.compile_link_inits(fresh_cells, rng, dcfg.compile_threads)
    logging.info(
      '%d link initialisers compiled by %d threads in %.1f s.', count, dcfg.compile_threads, time.time() - began
    )
  for k in selected:
    name = f'block{k + 1}'
    began = time.time()
    restored = None
    if managers[name].all_steps():  # restored into an abstract target: no initializer is compiled or run
      target = supernet_store.abstract_block_state(all_cells[k], sizes[k], optimizers[k])
      restored = supernet_store.restore_block(managers[name], target, k)
    if restored:
      states[name], meta = restored
      logging.info('%s resumed at step %d of %d.', name, int(states[name].step), total_steps)
    else:
      states[name] = supernet_store.create_block_state(
        jax.random.fold_in(rng, k), all_cells[k], sizes[k], optimizers[k]
      )
      meta = {}
      logging.info('%s: %d cells initialised in %.1f s.', name, len(all_cells[k]), time.time() - began)
    elapsed[name] = float(meta.get('elapsed_seconds', 0.0))
  if compiling is not None:
    waited = time.time()
    seconds = compiling.result()
    logging.info(
      'The step was traced and compiled in a second thread during initialisation: %.1f s (then waited %.1f s).',
      seconds,
      time.time() - waited,
    )
  active = {name: s for name, s in states.items() if int(s.step) < total_steps}
  for name in sorted(set(states) - set(active)):
    logging.info('%s already finished (%d steps); skipped.', name, total_steps)
  writer = metric_writers.create_default_writer(str(paths.distill / 'tb'), just_logging=jax.process_index() > 0)
  history = json.loads(paths.distill_history.read_text()) if paths.distill_history.exists() else []
  with checkpoints.Preemption() as preemption:
    training = _Training(dcfg, total_steps, steps_per_epoch, rates, managers, elapsed, writer, history, preemption)
    try:
      # Blocks restored at different steps train in separate groups, each from its own data position.
      for start in sorted({int(s.step) for s in active.values()}):
        group = {name: s for name, s in active.items() if int(s.step) == start}
        p_step = build_step(sorted(int(name[5:]) - 1 for name in group))
        stream = batches.pop(start, None) or data(start)
        states.update(_train_group(training, group, p_step, stream, teacher_variables, start))
        if preemption.requested:
          break
    finally:
      for manager in managers.values():
        manager.wait_until_finished()
        manager.close()
      writer.flush()
  if jax.process_index() == 0:
    files.atomic_write_text(paths.distill_history, json.dumps(history))
    plot_loss_curves(history, paths.loss_curves)
  if preemption.requested:
    raise SystemExit('Preempted (SIGTERM): checkpoints saved; rerun the same command to resume.')
  return {'final': history[-1][1] if history else {}}


def plot_loss_curves(history: list[tuple[int, dict[str, float]]], path: Any) -> None:
  """PNG of every cell's relative L1 over steps, one panel per block."""
  if not history:
    return
  plt = files.pyplot()
  keys = sorted({k for _, m in history for k in m if k.endswith('/rel_l1')})
  blocks = sorted({k.split('/')[0] for k in keys}, key=lambda b: int(b[5:]))
  fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks), 3), squeeze=False)
  for ax, block in zip(axes[0], blocks):
    for key in keys:
      if key.startswith(block + '/'):
        points = [(s, m[key]) for s, m in history if key in m]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key.split('/')[1])
    ax.set_title(block)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel('relative L1 |S-T|/std(T)')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=90)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The distill stage: trains every selected cell of every block to its step count."""
  space = space_lib.space_from_config(config.space)
  space_lib.parse_block_numbers(config.distill.blocks, len(space.blocks), 'distill.blocks')
  supernet.check_remat(config.distill.remat, 'distill.remat')
  distill_steps.check_programs(config.distill.programs, 'distill.programs')
  distill_steps.check_concurrent_cells(config.distill.concurrent_cells, 'distill.concurrent_cells')
  distill_steps.check_compile_threads(config.distill.compile_threads, 'distill.compile_threads')
  parse_learning_rates(config.distill.learning_rates, len(space.blocks))
  parallel.check_global_batch(config.distill.batch_size, 'distill.batch_size')
  input_pipeline.check_dataset(config.data)
  teacher_model, teacher_variables = teacher_lib.load_for_run(config, workdir)
  teacher_lib.check_space(space, teacher_model, config.space.stem_stride)
  steps_per_epoch = config.distill.steps_per_epoch
  if not steps_per_epoch:
    examples = input_pipeline.num_examples(config.data, 'train')
    if not examples:
      raise ValueError('cannot tell the size of the training split: set distill.steps_per_epoch')
    steps_per_epoch = max(1, examples // config.distill.batch_size)

  def data(start_step: int) -> Iterator[dict[str, np.ndarray]]:
    return input_pipeline.create_split(config.data, 'train', config.distill.batch_size, start_step=start_step)

  return train_blocks(config, workdir, teacher_model, teacher_variables, space, data, steps_per_epoch)
