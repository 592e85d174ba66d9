"""Retraining the searched child net from scratch (EfficientNet recipe), and evaluating it.

Recipe (EfficientNet's TPU recipe, which DNA follows): RMSProp in TensorFlow's form (decay 0.9,
momentum 0.9, eps 1e-3 inside the square root, mean-square initialised to 1, learning rate inside the
momentum), learning rate `base_learning_rate * batch_size / 256` with linear warm-up and a x0.97 staircase
every 2.4 epochs (or cosine), weight decay as an L2 term in the gradient (coupled, as EfficientNet's
`weight_decay * l2_loss`) on kernels only (not BatchNorm, not biases), label smoothing, dropout,
drop-connect growing with depth, and an exponential moving average of the weights and BatchNorm
statistics (TensorFlow's `num_updates` rule: decay min(d, (1 + t) / (10 + t))) used for evaluation.

Layout of WORKDIR/retrain/: checkpoints/ (Orbax: train state + meta JSON with elapsed time, every eval
and the best one; resumed automatically), best/ (weights of the best eval top-1, EMA or raw) and final/
(final EMA weights; both child checkpoints, see `export.py`), tb/ (TensorBoard), results.json ({arch,
params, flops, macs, image_size, num_classes, steps, elapsed_seconds, final: {step, epoch, ema: {top1,
top5, loss, count}, raw: {...}}, best: {step, weights, top1, top5}}; accuracies are fractions) and, from
the evaluate stage, evaluation.json.
The train loop is generic over any Flax model returning (logits, features) with BatchNorm; the
teacher stage (`train_teacher.py`) reuses it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
import flax
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from dna_jax import costs
from dna_jax import export as export_lib
from dna_jax import files
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax.models import child
from dna_jax.models import layers

Array = jax.Array
Batches = Callable[[int], Iterator[dict[str, np.ndarray]]]


def cross_entropy_loss(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Mean softmax cross-entropy against one-hot labels smoothed as in TF (1 - s) * y + s / C."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def topk_correct(logits: Array, labels: Array, k: int) -> Array:
  """1.0 per example whose label is among the top-k logits."""
  _, top = lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def create_learning_rate_fn(tc: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up to `base_learning_rate * batch_size / 256`, then exponential staircase or cosine."""
  peak = tc.base_learning_rate * tc.batch_size / 256
  warmup = epochs_to_steps(tc.warmup_epochs, steps_per_epoch)
  total = epochs_to_steps(tc.epochs, steps_per_epoch)
  if tc.schedule == 'exponential':
    # As EfficientNet: the staircase counts from step 0; warm-up overrides its first steps.
    decay_steps = max(1.0, tc.lr_decay_epochs * steps_per_epoch)

    def schedule(step):
      decayed = peak * tc.lr_decay ** jnp.floor(step / decay_steps)
      return jnp.where(step < warmup, peak * step / max(warmup, 1), decayed)

    return schedule
  if tc.schedule == 'cosine':
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.cosine_decay_schedule(peak, max(total - warmup, 1))], [warmup]
    )
  raise ValueError(f"schedule must be 'exponential' or 'cosine', got {tc.schedule!r}")


def kernel_mask(params: Any) -> Any:
  """True for kernels (ndim > 1): weight decay skips BatchNorm scales/offsets and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(tc: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """'rmsprop' (TF's, see the module docstring), 'sgd' (Nesterov momentum) or 'adam'; coupled L2."""
  l2 = optax.add_decayed_weights(tc.weight_decay, mask=kernel_mask)
  if tc.optimizer == 'rmsprop':
    return optax.chain(
      l2,
      optax.scale_by_rms(decay=tc.rms_decay, eps=tc.rms_epsilon, initial_scale=1.0, eps_in_sqrt=True),
      optax.scale_by_learning_rate(learning_rate_fn),
      optax.trace(decay=tc.momentum),
    )
  if tc.optimizer == 'sgd':
    return optax.chain(
      l2, optax.scale_by_learning_rate(learning_rate_fn), optax.trace(decay=tc.momentum, nesterov=True)
    )
  if tc.optimizer == 'adam':
    return optax.chain(l2, optax.scale_by_adam(), optax.scale_by_learning_rate(learning_rate_fn))
  raise ValueError(f"optimizer must be 'rmsprop', 'sgd' or 'adam', got {tc.optimizer!r}")


def ema_decay_at(step: Array, decay: float) -> Array:
  """TF ExponentialMovingAverage with num_updates: min(decay, (1 + step) / (10 + step))."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
  state: TrainState,
  batch: dict[str, Array],
  *,
  learning_rate_fn: optax.Schedule,
  label_smoothing: float,
  ema_decay: float,
  normalization: tuple[str, str] | None = None,
) -> tuple[TrainState, dict[str, Array]]:
  """One per-device step (named axis `parallel.AXIS`); state in and out identical on every device.

  `normalization` (source, target) converts the images first (see `export.normalize`).
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.dropout_rng, state.step), parallel.device_index())
  images = batch['image']
  if normalization is not None:
    images = export_lib.normalize(images.astype(jnp.float32), *normalization)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    return cross_entropy_loss(logits, batch['label'], label_smoothing), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(parallel.varying(state.params))
  grads = lax.pmean(grads, parallel.AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  decay = ema_decay_at(state.step, ema_decay)
  average = lambda ema, new: jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, ema, new)
  new_state = new_state.replace(
    ema_params=average(state.ema_params, new_state.params),
    ema_batch_stats=average(state.ema_batch_stats, new_state.batch_stats),
  )
  metrics = lax.pmean({'loss': loss, 'top1': jnp.mean(topk_correct(logits, batch['label'], 1))}, parallel.AXIS)
  metrics.update(
    learning_rate=learning_rate_fn(state.step),
    grad_norm=optax.global_norm(grads),
    param_norm=optax.global_norm(new_state.params),
  )
  return new_state, metrics


def eval_step(
  variables: Any, batch: dict[str, Array], *, apply_fn: Callable[..., Any], normalization: tuple[str, str] | None = None
) -> dict[str, Array]:
  """Sums over all devices of loss, top-1 and top-5 hits and counted examples (padding masked out)."""
  images = batch['image']
  if normalization is not None:
    images = export_lib.normalize(images.astype(jnp.float32), *normalization)
  logits, _ = apply_fn(variables, images, train=False)
  labels = batch['label']
  mask = batch['mask'].astype(jnp.float32) if 'mask' in batch else jnp.ones(labels.shape, jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  sums = {
    'loss': jnp.sum(loss * mask),
    'top1': jnp.sum(topk_correct(logits, labels, 1) * mask),
    'top5': jnp.sum(topk_correct(logits, labels, 5) * mask),
    'count': jnp.sum(mask),
  }
  return lax.psum(sums, parallel.AXIS)


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics, their and the weights' EMA, and the dropout key."""

  batch_stats: Any
  ema_params: Any
  ema_batch_stats: Any
  dropout_rng: Array


def create_train_state(rng: Array, model: Any, image_size: int, tx: optax.GradientTransformation) -> TrainState:
  """Fresh state; the EMA starts at the initial weights."""
  init_rng, dropout_rng = jax.random.split(rng)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, images)
  unknown = sorted(set(variables) - {'params', 'batch_stats'})
  if unknown:
    raise ValueError(f'the train loop handles params and batch_stats only; the model also has {unknown}')
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
    ema_params=variables['params'],
    ema_batch_stats=variables['batch_stats'],
    dropout_rng=dropout_rng,
  )


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """The one place where durations in epochs become steps."""
  return int(round(epochs * steps_per_epoch))


def steps_per_epoch(tc: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict) -> int:
  """`tc.steps_per_epoch` if set, else training examples // global batch."""
  if tc.steps_per_epoch:
    return int(tc.steps_per_epoch)
  from dna_jax import input_pipeline

  examples = input_pipeline.num_examples(data_config, 'train')
  if not examples:
    raise ValueError('cannot tell the size of the training split: set steps_per_epoch in the config')
  return max(1, examples // tc.batch_size)


def variables_of(state: TrainState, ema: bool) -> dict[str, Any]:
  """The model variables of `state`: its EMA ones or the trained ones."""
  return {
    'params': state.ema_params if ema else state.params,
    'batch_stats': state.ema_batch_stats if ema else state.batch_stats,
  }


def parallel_eval(
  mode: str, apply_fn: Callable[..., Any], normalization: tuple[str, str] | None = None
) -> Callable[[Any, Any], dict[str, Array]]:
  step = functools.partial(eval_step, apply_fn=apply_fn, normalization=normalization)
  if mode == 'pmap':
    return jax.pmap(step, axis_name=parallel.AXIS, in_axes=(None, 0), out_axes=None)
  mapped = jax.shard_map(step, mesh=parallel.make_mesh(), in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  return jax.jit(mapped)


def evaluate_batches(
  eval_fn: Callable[[Any, Any], dict[str, Array]], variables: Any, batches: Iterable[dict[str, np.ndarray]], mode: str
) -> dict[str, float]:
  """Top-1/top-5 accuracy (fractions) and mean loss over every batch of an eval split."""
  totals = None
  for batch in batches:
    sums = eval_fn(variables, parallel.shard_batch(batch, mode))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('the eval split yielded no batches')
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals['count'], 1.0)
  return {
    'top1': totals['top1'] / count,
    'top5': totals['top5'] / count,
    'loss': totals['loss'] / count,
    'count': int(totals['count']),
  }


def device_batches(batches: Iterator[dict[str, np.ndarray]], mode: str, size: int = 2) -> Iterator[Any]:
  """Host batches put on the devices `size` steps ahead, laid out for `parallel.data_parallel(mode)`."""
  if mode == 'pmap':
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()), ('local',)), P('local'))
    put = lambda batch: jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  else:
    put = lambda batch: parallel.shard_batch(batch, mode)
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def check_finite(window: list[tuple[int, dict[str, float]]]) -> None:
  """Raises naming the first step whose loss or gradient norm is NaN/Inf."""
  for step, metrics in window:
    bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(metrics[k])]
    if bad:
      raise FloatingPointError(
        f'non-finite {" and ".join(bad)} at step {step} ({metrics}); the last checkpoint '
        'was saved before it. Lower the learning rate or check the data.'
      )


def train_and_evaluate(
  model: Any,
  tc: ml_collections.ConfigDict,
  directory: str,
  *,
  image_size: int,
  train_batches: Batches,
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None,
  steps_per_epoch: int,
  seed: int,
  on_best: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
  init_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
  normalization: tuple[str, str] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """Trains `model` (bn_axis_name=parallel.AXIS) as `tc` says, resuming from `directory`/checkpoints.

  `tc` holds a retrain-like section (batch_size, epochs, optimizer..., parallel, checkpoint_every_steps,
  keep_checkpoints, log_every_steps, eval_every_epochs). `train_batches(start_step)` yields host batches
  (local_devices, per_device, ...); `eval_batches()` one pass of the eval split. `on_best(variables,
  results)` runs (on every process) each time the eval top-1 improves; `init_fn(variables)` replaces the
  initial variables of a fresh run (not of a resumed one); `normalization` (data's, model's) converts
  images on device. Returns the final state and a results dict.
  """
  root = epath.Path(directory)
  mode = tc.parallel
  parallel.check_global_batch(tc.batch_size, 'batch_size')
  total_steps = epochs_to_steps(tc.epochs, steps_per_epoch)
  eval_every = epochs_to_steps(tc.eval_every_epochs, steps_per_epoch) if eval_batches else 0
  learning_rate_fn = create_learning_rate_fn(tc, steps_per_epoch)
  state = create_train_state(jax.random.PRNGKey(seed), model, image_size, create_optimizer(tc, learning_rate_fn))
  manager = ocp.CheckpointManager(
    root / 'checkpoints',
    options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True, enable_async_checkpointing=True),
  )
  meta: dict[str, Any] = {'elapsed_seconds': 0.0, 'best': None, 'evals': []}
  if manager.latest_step() is not None:
    restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(parallel.host_copy(state)), meta=ocp.args.JsonRestore()),
    )
    state, meta = restored['state'], restored['meta']
    logging.info('Resumed from %s at step %d of %d.', root / 'checkpoints', int(state.step), total_steps)
  else:
    if init_fn is not None:
      variables = init_fn(variables_of(state, ema=False))
      state = state.replace(
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        ema_params=variables['params'],
        ema_batch_stats=variables['batch_stats'],
        opt_state=state.tx.init(variables['params']),
      )
    parameter_overview.log_parameter_overview(state.params)
  start = int(state.step)
  state = parallel.replicate(state, mode)
  p_step = parallel.data_parallel(
    functools.partial(
      train_step,
      learning_rate_fn=learning_rate_fn,
      label_smoothing=tc.label_smoothing,
      ema_decay=tc.ema_decay,
      normalization=normalization,
    ),
    mode,
    donate_state=mode == 'shard_map',
  )
  p_eval = parallel_eval(mode, model.apply, normalization)
  writer = metric_writers.create_default_writer(os.fspath(root / 'tb'), just_logging=jax.process_index() > 0)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  t0, elapsed0 = time.time(), float(meta['elapsed_seconds'])
  window: list[tuple[int, Any]] = []

  def flush(step: int) -> None:
    fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(window)]
    window.clear()
    check_finite(fetched)
    if fetched:
      means = {f'train/{k}': float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
      writer.write_scalars(step, means)

  def save(step: int) -> None:
    flush(step)
    meta['elapsed_seconds'] = elapsed0 + time.time() - t0
    if step not in manager.all_steps():
      manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(parallel.host_copy(state)), meta=ocp.args.JsonSave(meta)),
        force=True,
      )

  def evaluate_now(step: int) -> dict[str, Any]:
    with report.timed('eval'):
      result = {
        name: evaluate_batches(p_eval, variables_of(state, name == 'ema'), eval_batches(), mode)
        for name in ('ema', 'raw')
      }
    writer.write_scalars(step, {f'eval/{n}_{k}': v for n, r in result.items() for k, v in r.items()})
    weights = max(result, key=lambda n: result[n]['top1'])
    record = {'step': step, 'epoch': step / steps_per_epoch, **result}
    meta['evals'].append(record)
    if meta['best'] is None or result[weights]['top1'] > meta['best']['top1']:
      meta['best'] = {
        'step': step,
        'weights': weights,
        'top1': result[weights]['top1'],
        'top5': result[weights]['top5'],
      }
      if on_best is not None:
        on_best(parallel.host_copy(variables_of(state, weights == 'ema')), meta['best'])
    logging.info(
      'Eval at step %d: EMA top-1 %.2f%% top-5 %.2f%% | raw top-1 %.2f%% top-5 %.2f%%',
      step,
      *(100 * result[n][k] for n in ('ema', 'raw') for k in ('top1', 'top5')),
    )
    return record

  try:
    batches = device_batches(train_batches(start), mode)
    for step in range(start + 1, total_steps + 1):
      state, metrics = p_step(state, next(batches))
      window.append((step, metrics))
      report(step)
      if step % tc.log_every_steps == 0:
        flush(step)
      if eval_every and step % eval_every == 0 and step != total_steps:
        evaluate_now(step)
      if step % tc.checkpoint_every_steps == 0:
        save(step)
      if manager.reached_preemption(step):
        save(step)
        manager.wait_until_finished()
        raise SystemExit(f'Preempted at step {step}: checkpoint saved in {root / "checkpoints"}; rerun to resume.')
    final_eval = None
    if eval_batches is not None:
      last = meta['evals'][-1] if meta['evals'] else None
      final_eval = last if last and last['step'] == total_steps else evaluate_now(total_steps)
    save(total_steps)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  results = {
    'steps': total_steps,
    'elapsed_seconds': round(elapsed0 + time.time() - t0, 1),
    'final': final_eval,
    'best': meta['best'],
  }
  return state, results


def supernet_cell_variables(workdir: str, block_index: int, cell_index: int) -> dict[str, Any]:
  """{'params', 'batch_stats'} of one distilled supernet cell (latest WORKDIR/distill/block_K checkpoint)."""
  directory = epath.Path(workdir) / 'distill' / f'block_{block_index + 1}'
  step = None
  if directory.exists():
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'init_from_supernet: no distillation checkpoint in {directory}; run stages=distill '
      'in this workdir first or set retrain.init_from_supernet=False'
    )
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  manager.close()
  name = f'cell{cell_index}'
  if name not in state['params']:
    raise ValueError(f'{directory} at step {step} holds no {name} (cells: {sorted(state["params"])})')
  return {'params': state['params'][name], 'batch_stats': state['batch_stats'][name]}


def transfer_supernet_weights(
  child_variables: Mapping[str, Any], arch: space_lib.Architecture, cells: list[Mapping[str, Any]]
) -> tuple[dict[str, Any], int, int]:
  """Child variables with every leaf of the chosen supernet paths copied where the shapes agree.

  `cells[k]` holds the variables of the supernet cell chosen for block k (layer l, op o under
  'layer{l}/{op name}'; block 1 also 'stem' and 'ds'). Leaves whose shape differs (the first layer of a
  block reads the teacher's width in the supernet, the last one writes it) keep the child's
  initialisation. Returns (variables, leaves copied, leaves kept).
  """
  sources = {}
  for k, (choice, cell) in enumerate(zip(arch.blocks, cells)):
    if k == 0:
      sources['stem'], sources['ds'] = ('stem',), ('ds',)
    for l, op_id in enumerate(choice.ops):
      sources[f'block{k + 1}_layer{l}'] = (k, f'layer{l}', space_lib.OP_NAMES[op_id])
  copied = kept = 0
  result = {}
  for collection, tree in child_variables.items():
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for key, value in flat.items():
      source = sources.get(key[0])
      found = None
      if source is not None:
        block, *path = (0, *source) if source[0] in ('stem', 'ds') else source
        node = cells[block].get(collection, {})
        for part in (*path, *key[1:]):
          node = node.get(part) if isinstance(node, Mapping) else None
        found = node
      if found is not None and tuple(np.shape(found)) == tuple(np.shape(value)):
        flat[key] = jnp.asarray(found, dtype=value.dtype)
        copied += 1
      else:
        kept += 1
    result[collection] = flax.traverse_util.unflatten_dict(flat)
  return result, copied, kept


def init_from_supernet(
  child_variables: Mapping[str, Any], arch: space_lib.Architecture, workdir: str, *, space: space_lib.SearchSpace
) -> dict[str, Any]:
  """Initialises the child from the distilled supernet's weights of its chosen cells and paths."""
  located = space_lib.locate(space, arch)
  if located is None:
    raise ValueError(f'init_from_supernet: architecture {arch} is not in the configured search space')
  cells = [supernet_cell_variables(workdir, k, c) for k, c in enumerate(located)]
  variables, copied, kept = transfer_supernet_weights(child_variables, arch, cells)
  logging.info('init_from_supernet: %d variables copied from the supernet, %d kept from random init.', copied, kept)
  return variables


def resolve_architecture(name: str, workdir: str) -> space_lib.Architecture:
  """'search' (WORKDIR/search/arch_1.json), a named net, an architecture string or a JSON path."""
  if name == 'search':
    path = epath.Path(workdir) / 'search' / 'arch_1.json'
    if not path.exists():
      raise FileNotFoundError(
        f'retrain.arch=search but {path} does not exist: run stages=search first, or set '
        f'retrain.arch to one of {", ".join(space_lib.NAMED_ARCHITECTURES)} or a JSON path'
      )
    return space_lib.Architecture.from_json(path.read_text())
  return space_lib.load_architecture(name)


def data_normalization(data_config: ml_collections.ConfigDict) -> str:
  """How the input pipeline normalises images, in `export.NORMALIZATIONS` terms."""
  name = data_config.normalization
  if name not in export_lib.NORMALIZATIONS:
    raise ValueError(f'data.normalization {name!r} is not one of {", ".join(export_lib.NORMALIZATIONS)}')
  return name


def child_model(config: ml_collections.ConfigDict, arch: space_lib.Architecture, num_classes: int) -> child.ChildNet:
  rc = config.retrain
  return child.ChildNet(
    arch,
    num_classes,
    rc.dropout_rate,
    rc.drop_connect_rate,
    config.space.stem_stride,
    layers.conventions_from_config(config.model),
    bn_axis_name=parallel.AXIS,
  )


def _write_json(path: epath.Path, data: Any) -> None:
  if jax.process_index() == 0:
    files.atomic_write_text(path, json.dumps(data, indent=1))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The retrain stage: trains the chosen child net and writes best/, final/ and results.json."""
  from dna_jax import input_pipeline

  rc = config.retrain
  arch = resolve_architecture(rc.arch, workdir)
  parallel.check_global_batch(rc.batch_size, 'retrain.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  image_size = config.data.image_size
  model = child_model(config, arch, num_classes)
  root = epath.Path(workdir) / 'retrain'
  source, target = data_normalization(config.data), rc.normalization
  meta = export_lib.make_meta(
    arch, num_classes, image_size, model.conventions, target, config.space.stem_stride, source='retrain'
  )
  cost, _ = costs.architecture_cost(arch, image_size, num_classes, config.space.stem_stride)
  logging.info(
    'Retraining %s: %.2fM params, %.1fM FLOPs at %d px.', arch, cost.params / 1e6, cost.flops / 1e6, image_size
  )

  def on_best(variables: dict[str, Any], best: dict[str, Any]) -> None:
    export_lib.save_child_checkpoint(os.fspath(root / 'best'), variables, {**meta, **best})

  init_fn = None
  if rc.init_from_supernet:
    space = space_lib.space_from_config(config.space)
    init_fn = lambda variables: init_from_supernet(variables, arch, workdir, space=space)
  state, results = train_and_evaluate(
    model,
    rc,
    os.fspath(root),
    image_size=image_size,
    steps_per_epoch=steps_per_epoch(rc, config.data),
    seed=config.seed,
    on_best=on_best,
    init_fn=init_fn,
    normalization=None if source == target else (source, target),
    train_batches=lambda start: input_pipeline.create_split(config.data, 'train', rc.batch_size, start_step=start),
    eval_batches=lambda: input_pipeline.create_split(config.data, 'eval', rc.batch_size),
  )
  export_lib.save_child_checkpoint(
    os.fspath(root / 'final'),
    parallel.host_copy(variables_of(state, ema=True)),
    {**meta, 'weights': 'ema', 'step': results['steps']},
  )
  results = {
    'arch': str(arch),
    'params': cost.params,
    'flops': cost.flops,
    'macs': cost.macs,
    'image_size': image_size,
    'num_classes': num_classes,
    **results,
  }
  _write_json(root / 'results.json', results)
  final = results['final'] or {}
  return {
    'arch': str(arch),
    'top1': final.get('ema', {}).get('top1'),
    'top5': final.get('ema', {}).get('top5'),
    'best_top1': (results['best'] or {}).get('top1'),
    'params': cost.params,
    'flops': cost.flops,
  }


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The evaluate stage: top-1/top-5 of retrain.checkpoint, or of WORKDIR/retrain/{final,best}."""
  from dna_jax import input_pipeline

  rc = config.retrain
  root = epath.Path(workdir) / 'retrain'
  if rc.checkpoint:
    directories = {'checkpoint': rc.checkpoint}
  else:
    directories = {n: os.fspath(root / n) for n in ('final', 'best') if (root / n / export_lib.META_FILE).exists()}
  if not directories:
    raise FileNotFoundError(
      f'nothing to evaluate: no {root}/final or {root}/best (run stages=retrain) and retrain.checkpoint is empty'
    )
  parallel.check_global_batch(rc.batch_size, 'retrain.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  source = data_normalization(config.data)
  dtype = layers.conventions_from_config(config.model).dtype
  results = {}
  for name, directory in directories.items():
    model, variables, meta = export_lib.load_child_checkpoint(directory, dtype=dtype, depthwise=config.model.depthwise)
    if meta['num_classes'] != num_classes:
      raise ValueError(
        f'{directory} predicts {meta["num_classes"]} classes but {config.data.dataset} has {num_classes}'
      )
    target = meta['normalization']
    p_eval = parallel_eval(rc.parallel, model.apply, None if source == target else (source, target))
    results[name] = {
      'directory': directory,
      'arch': meta['arch'],
      **evaluate_batches(
        p_eval,
        parallel.replicate(variables, rc.parallel),
        input_pipeline.create_split(config.data, 'eval', rc.batch_size),
        rc.parallel,
      ),
    }
    logging.info(
      'Evaluated %s (%s): top-1 %.2f%% top-5 %.2f%% on %d images.',
      name,
      directory,
      100 * results[name]['top1'],
      100 * results[name]['top5'],
      results[name]['count'],
    )
  _write_json(root / 'evaluation.json', results)
  return {f'{name}_{k}': r[k] for name, r in results.items() for k in ('top1', 'top5')}
