"""Block-wise distillation: every cell of every block trained in one data-parallel run.

One step runs the frozen teacher once on the batch and trains all selected cells of
all blocks against its block outputs (student block k reads teacher block k-1; block
1 reads the image through its own stem). Each device samples its own path per cell;
gradients and BatchNorm statistics are averaged over devices. Each block is
checkpointed on its own (WORKDIR/distill/block_K), so blocks can be trained, resumed
and rated independently.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import functools
import json
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax.models import layers
from dna_jax.models import supernet

Array = jax.Array


def distill_losses(student: Array, target: Array) -> tuple[Array, Array]:
  """MSE (the training loss) and DNA's relative L1: mean |S - T| / std(T)."""
  student, target = student.astype(jnp.float32), target.astype(jnp.float32)
  mse = jnp.mean(jnp.square(student - target))
  rel_l1 = jnp.mean(jnp.abs(student - target)) / (jnp.std(target) + 1e-8)
  return mse, rel_l1


def create_learning_rate_fn(base_lr: float, decay: float, steps_per_epoch: int) -> optax.Schedule:
  """DNA's schedule: base_lr * decay ** epoch (staircase)."""
  return optax.exponential_decay(base_lr, steps_per_epoch, decay, staircase=True)


def kernel_mask(params: Any) -> Any:
  """True on conv/dense kernels: the only leaves that get weight decay."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == 'kernel', params)


def create_optimizer(learning_rate_fn: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (as torch.optim.Adam does) on kernels only."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=kernel_mask),
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(learning_rate_fn),
  )


def sample_path(rng: Array, step: Array, num_layers: int, sampling: str) -> Array:
  if sampling == 'uniform':
    return supernet.random_path(jax.random.fold_in(rng, step), num_layers)
  return supernet.fair_path(rng, step, num_layers)


class BlockState(struct.PyTreeNode):
  """Every cell of one block: parameters, BatchNorm statistics, optimizer state."""

  step: Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: Any


def distill_step(
  states: dict[str, BlockState],
  batch: dict[str, Array],
  teacher_variables: Any,
  *,
  blocks: tuple[tuple[int, tuple[supernet.SupernetCell, ...]], ...],
  teacher_apply: Callable[[Any, Array], dict[str, Array]],
  optimizers: dict[str, optax.GradientTransformation],
  sampling: str,
  seed: int,
) -> tuple[dict[str, BlockState], dict[str, Array]]:
  """One per-device step over all selected blocks (`blocks`: (block index, cells) pairs)."""
  images = batch['image']
  features = lax.stop_gradient(teacher_apply(teacher_variables, images))
  step = next(iter(states.values())).step
  path_rng = jax.random.fold_in(jax.random.PRNGKey(seed), parallel.device_index())
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
        path = sample_path(jax.random.fold_in(path_rng, 64 * k + c), step, cell.cell.layers, sampling)
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
    updates, opt_state = optimizers[name].update(grads[name], state.opt_state, state.params)
    batch_stats = {cname: lax.pmean(aux[(name, cname)][0], parallel.AXIS) for cname in state.params}
    new_states[name] = BlockState(state.step + 1, optax.apply_updates(state.params, updates), batch_stats, opt_state)
    metrics[f'{name}/grad_norm'] = optax.global_norm(grads[name])
    for cname in state.params:
      metrics[f'{name}/{cname}/mse'] = aux[(name, cname)][1]
      metrics[f'{name}/{cname}/rel_l1'] = aux[(name, cname)][2]
  return new_states, lax.pmean(metrics, parallel.AXIS)


@functools.cache
def parallel_distill_step(
  blocks: tuple[tuple[int, tuple[supernet.SupernetCell, ...]], ...],
  teacher_model: Any,
  train_mode_bn: bool,
  learning_rates: tuple[tuple[str, float], ...],
  lr_decay: float,
  steps_per_epoch: int,
  weight_decay: float,
  sampling: str,
  seed: int,
  mode: str,
) -> Callable[..., Any]:
  """The device-parallel distillation step, built once per configuration (so compiled once)."""
  from dna_jax import teacher as teacher_lib

  teacher_apply = functools.partial(
    teacher_lib.teacher_features, teacher_model, up_to=max(k for k, _ in blocks) + 1, train_mode_bn=train_mode_bn
  )
  optimizers = {
    name: create_optimizer(create_learning_rate_fn(lr, lr_decay, steps_per_epoch), weight_decay)
    for name, lr in learning_rates
  }
  step_fn = functools.partial(
    distill_step, blocks=blocks, teacher_apply=teacher_apply, optimizers=optimizers, sampling=sampling, seed=seed
  )
  return parallel.data_parallel(step_fn, mode, num_broadcast=1)


def create_block_state(
  rng: Array, cells: tuple[supernet.SupernetCell, ...], input_size: int, optimizer: optax.GradientTransformation
) -> BlockState:
  """Fresh variables for every cell of a block (shapes from a one-image example input)."""
  params, stats = {}, {}
  for c, cell in enumerate(cells):
    variables = jax.jit(cell.init)(jax.random.fold_in(rng, c), supernet.zeros_like_input(cell, 1, input_size))
    params[f'cell{c}'], stats[f'cell{c}'] = variables['params'], variables['batch_stats']
  return BlockState(jnp.zeros((), jnp.int32), params, stats, optimizer.init(params))


def parse_blocks(text: str, num_blocks: int) -> list[int]:
  """'' -> all blocks; '2,3' -> [1, 2] (0-based), with a clear error for bad numbers."""
  if not text.strip():
    return list(range(num_blocks))
  try:
    chosen = sorted({int(b) - 1 for b in text.split(',') if b.strip()})
  except ValueError:
    raise ValueError(f'blocks={text!r}: expected comma-separated block numbers 1..{num_blocks}') from None
  if not chosen or chosen[0] < 0 or chosen[-1] >= num_blocks:
    raise ValueError(f'blocks={text!r}: block numbers must lie in 1..{num_blocks}')
  return chosen


def parse_learning_rates(text: str, num_blocks: int) -> list[float]:
  rates = [float(r) for r in str(text).split(',') if r.strip()]
  if len(rates) == 1:
    rates = rates * num_blocks
  if len(rates) != num_blocks:
    raise ValueError(
      f'distill.learning_rates has {len(rates)} values but the space has {num_blocks} blocks '
      '(give one value, or one per block)'
    )
  return rates


def block_input_sizes(image_size: int, stem_stride: int, space: space_lib.SearchSpace) -> list[int]:
  """Spatial size of each block's supernet input (block 1: the image)."""
  sizes = [image_size]
  size = layers.output_size(image_size, 3, stem_stride, 'tf_same')
  for block in space.blocks[:-1]:
    size = layers.output_size(size, 3, block.stride, 'tf_same')
    sizes.append(size)
  return sizes


def checkpoint_manager(directory: epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      create=True,
      # Several managers saving at once deadlock in Orbax's async finalize barrier across processes.
      enable_async_checkpointing=jax.process_count() == 1,
    ),
  )


def restore_latest(
  manager: ocp.CheckpointManager, target: BlockState, where: str
) -> tuple[BlockState, dict[str, Any]] | None:
  """The newest readable checkpoint; a corrupt newest one is skipped with a warning."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
      )
      return restored['state'], restored['meta']
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: checkpoint at step %d is unreadable (%s); trying the previous one.', where, step, e)
  return None


def save_block(manager: ocp.CheckpointManager, state: BlockState, meta: dict[str, Any]) -> None:
  """Saves on every process (Orbax synchronises them; process 0 writes)."""
  step = int(state.step)
  # Host copies: the step's outputs are replicated over every device, and Orbax would slice each replica.
  host_state = parallel.host_copy(state)
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)), force=True
  )


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


class _Preemption:
  """SIGTERM (a preempted spot VM) asks the loop to save and stop."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True


def train_blocks(
  config: ml_collections.ConfigDict,
  workdir: str,
  teacher_model: Any,
  teacher_variables: Any,
  space: space_lib.SearchSpace,
  data: Callable[[int], Iterator[dict[str, np.ndarray]]],
  steps_per_epoch: int,
) -> dict[str, Any]:
  """Trains (or resumes) the selected blocks; returns final per-cell losses."""
  dcfg = config.distill
  conventions = layers.conventions_from_config(config.model)
  all_cells = supernet.supernet_cells(space, conventions=conventions, stem_stride=config.space.stem_stride)
  rates = parse_learning_rates(dcfg.learning_rates, len(space.blocks))
  total_steps = dcfg.epochs * steps_per_epoch
  sizes = block_input_sizes(config.data.image_size, config.space.stem_stride, space)
  optimizers = {
    f'block{k + 1}': create_optimizer(
      create_learning_rate_fn(rates[k], dcfg.lr_decay, steps_per_epoch), dcfg.weight_decay
    )
    for k in range(len(space.blocks))
  }
  root = epath.Path(workdir) / 'distill'
  managers, states, elapsed = {}, {}, {}
  rng = jax.random.PRNGKey(config.seed)
  for k in parse_blocks(dcfg.blocks, len(space.blocks)):
    name = f'block{k + 1}'
    managers[name] = checkpoint_manager(root / f'block_{k + 1}', dcfg)
    fresh = create_block_state(jax.random.fold_in(rng, k), tuple(all_cells[k]), sizes[k], optimizers[name])
    restored = restore_latest(managers[name], fresh, name)
    states[name], meta = restored if restored else (fresh, {})
    elapsed[name] = float(meta.get('elapsed_seconds', 0.0))
    if restored:
      logging.info('%s resumed at step %d of %d.', name, int(states[name].step), total_steps)
  active = {name: s for name, s in states.items() if int(s.step) < total_steps}
  for name in sorted(set(states) - set(active)):
    logging.info('%s already finished (%d steps); skipped.', name, total_steps)
  writer = metric_writers.create_default_writer(str(root / 'tb'), just_logging=jax.process_index() > 0)
  history_path = root / 'history.json'
  history = json.loads(history_path.read_text()) if history_path.exists() else []
  preemption = _Preemption()
  previous_handler = signal.signal(signal.SIGTERM, preemption)
  try:
    # Blocks restored at different steps train in separate groups, each from its own data position.
    for start in sorted({int(s.step) for s in active.values()}):
      group = {name: s for name, s in active.items() if int(s.step) == start}
      block_ids = sorted(int(name[5:]) - 1 for name in group)
      p_step = parallel_distill_step(
        tuple((k, tuple(all_cells[k])) for k in block_ids),
        teacher_model,
        config.teacher.train_mode_bn,
        tuple((f'block{k + 1}', rates[k]) for k in block_ids),
        dcfg.lr_decay,
        steps_per_epoch,
        dcfg.weight_decay,
        dcfg.sampling,
        config.seed,
        dcfg.parallel,
      )
      group = _train_group(
        group,
        p_step,
        data(start),
        teacher_variables,
        start,
        total_steps,
        managers,
        elapsed,
        writer,
        history,
        config,
        preemption,
        steps_per_epoch,
        rates,
      )
      states.update(group)
      if preemption.requested:
        break
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    for manager in managers.values():
      manager.wait_until_finished()
      manager.close()
    writer.flush()
  if jax.process_index() == 0:
    history_path.write_text(json.dumps(history))
    plot_loss_curves(history, root / 'loss_curves.png')
  if preemption.requested:
    raise SystemExit('Preempted (SIGTERM): checkpoints saved; rerun the same command to resume.')
  return {'final': history[-1][1] if history else {}}


def _train_group(
  states,
  p_step,
  batches,
  teacher_variables,
  start,
  total_steps,
  managers,
  elapsed,
  writer,
  history,
  config,
  preemption,
  steps_per_epoch,
  rates,
):
  dcfg = config.distill
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  hooks = [report]
  if dcfg.profile_steps and jax.process_index() == 0:
    hooks.append(
      periodic_actions.Profile(
        num_profile_steps=dcfg.profile_steps, logdir=str(epath.Path(managers[next(iter(managers))].directory).parent)
      )
    )
  pending: list[tuple[int, Any]] = []
  t0 = time.time()
  global_batch = dcfg.batch_size

  def flush(step):
    fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
    pending.clear()
    check_finite(fetched)
    if fetched:
      s, last = fetched[-1]
      epoch = (s - 1) // steps_per_epoch
      scalars = {**last, 'images_per_second': global_batch * len(fetched) / max(time.time() - flush.t, 1e-9)}
      for name in states:
        scalars[f'{name}/learning_rate'] = rates[int(name[5:]) - 1] * dcfg.lr_decay**epoch
      writer.write_scalars(s, scalars)
      history.append((s, last))
    flush.t = time.time()

  flush.t = time.time()

  saved = set()

  def save(step):
    flush(step)
    if step in saved:
      return
    saved.add(step)
    for name, state in states.items():
      meta = {'step': step, 'elapsed_seconds': elapsed[name] + time.time() - t0, 'total_steps': total_steps}
      save_block(managers[name], state, meta)

  states = parallel.replicate(parallel.host_copy(states), dcfg.parallel)
  step = start
  for step in range(start + 1, total_steps + 1):
    batch = next(batches)
    with jax.profiler.StepTraceAnnotation('distill', step_num=step):
      states, metrics = p_step(states, parallel.shard_batch(batch, dcfg.parallel), teacher_variables)
    pending.append((step, metrics))
    for hook in hooks:
      hook(step)
    if step % dcfg.log_every_steps == 0:
      flush(step)
    if step % dcfg.checkpoint_every_steps == 0 or step == total_steps:
      save(step)
    if preemption.requested or any(m.reached_preemption(step) for m in managers.values()):
      logging.warning('Preemption at step %d: saving every block and stopping.', step)
      preemption.requested = True
      save(step)
      break
  return states


def plot_loss_curves(history: list[tuple[int, dict[str, float]]], path: epath.Path) -> None:
  """PNG of every cell's relative L1 over steps, one panel per block."""
  if not history:
    return
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

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
  with path.open('wb') as f:
    fig.savefig(f, dpi=90)
  plt.close(fig)


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any]:
  """The frozen teacher named by the config (or trained into WORKDIR/teacher by the teacher stage)."""
  from dna_jax import teacher as teacher_lib

  directory = config.teacher.checkpoint or str(epath.Path(workdir) / 'teacher')
  teacher_lib.check(directory, config.teacher.variant)
  return teacher_lib.load(directory)


def check_space_against_teacher(space: space_lib.SearchSpace, teacher_model: Any, stem_stride: int) -> None:
  """Every block's teacher width and stride must match the teacher's stage it is cut at."""
  from dna_jax.models import efficientnet

  if teacher_model.stem_stride != stem_stride:
    raise ValueError(
      f"space.stem_stride={stem_stride} but the teacher's stem stride is {teacher_model.stem_stride}: "
      'student and teacher blocks would not have the same resolution'
    )
  widths = efficientnet.block_widths(teacher_model)
  strides = efficientnet.block_strides(teacher_model)
  if len(widths) < len(space.blocks):
    raise ValueError(
      f'the space has {len(space.blocks)} blocks but the teacher has only {len(widths)} distillable stages'
    )
  for k, block in enumerate(space.blocks):
    if block.teacher_width != widths[k] or block.stride != strides[k]:
      raise ValueError(
        f'space block {k + 1} expects teacher width {block.teacher_width} and stride {block.stride}, '
        f'but teacher block {k + 1} has width {widths[k]} and stride {strides[k]}'
      )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The distill stage: trains every selected cell of every block to its step count."""
  space = space_lib.space_from_config(config.space)
  parse_blocks(config.distill.blocks, len(space.blocks))
  parse_learning_rates(config.distill.learning_rates, len(space.blocks))
  parallel.check_global_batch(config.distill.batch_size, 'distill.batch_size')
  input_pipeline.check_dataset(config.data)
  teacher_model, teacher_variables = load_teacher(config, workdir)
  check_space_against_teacher(space, teacher_model, config.space.stem_stride)
  steps_per_epoch = config.distill.steps_per_epoch
  if not steps_per_epoch:
    examples = input_pipeline.num_examples(config.data, 'train')
    if not examples:
      raise ValueError('cannot tell the size of the training split: set distill.steps_per_epoch')
    steps_per_epoch = max(1, examples // config.distill.batch_size)

  def data(start_step: int):
    batches = input_pipeline.create_split(config.data, 'train', config.distill.batch_size, start_step=start_step)
    return batches

  return train_blocks(config, workdir, teacher_model, teacher_variables, space, data, steps_per_epoch)
