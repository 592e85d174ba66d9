"""The classifier trainer: any Flax net returning (logits, features), trained and evaluated data-parallel.

One entry point, `train_and_evaluate`, serves the retrain stage, the demo teacher and the fidelity
study. Its recipe is a trainer section of the config (`config.retrain`, `config.teacher.training`):
RMSProp in TensorFlow's form (eps inside the square root, mean square initialised to 1, learning rate
inside the momentum), SGD with Nesterov momentum or Adam; learning rate `base_learning_rate *
batch_size / 256` with linear warm-up and an exponential staircase or cosine decay; weight decay as an
L2 term in the gradient on kernels only; label smoothing, dropout, drop-connect; an exponential
moving average of the weights and BatchNorm statistics (TensorFlow's `num_updates` rule) for
evaluation. `Data` says where the batches come from (`dataset` wires the tfds splits).

Checkpoints: DIRECTORY/checkpoints (Orbax: train state + meta JSON with elapsed time, every eval and
the best one), resumed automatically with a corrupt newest checkpoint skipped; SIGTERM saves and stops.
TensorBoard logs in DIRECTORY/tb.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from dna_jax import checkpoints
from dna_jax import images as images_lib
from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import run_once

Array = jax.Array
HostBatch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- losses, schedule, optimizer


def cross_entropy_loss(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Mean softmax cross-entropy against one-hot labels smoothed as in TF (1 - s) * y + s / C."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def topk_correct(logits: Array, labels: Array, k: int) -> Array:
  """1.0 per example whose label is among the top-k logits."""
  _, top = lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """The one place where durations in epochs become steps."""
  return round(epochs * steps_per_epoch)


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


def ema_decay_at(step: Array, decay: float, warmup: bool = True) -> Array:
  """TF ExponentialMovingAverage with num_updates: min(decay, (1 + step) / (10 + step)); `warmup=False`:
  the constant decay of timm's ModelEma (the authors' retraining script)."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(decay, jnp.float32)


# ----------------------------------------------------------------------------- per-device steps


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics, their and the weights' EMA, and the dropout key."""

  batch_stats: Any
  ema_params: Any
  ema_batch_stats: Any
  dropout_rng: Array


def _convert(batch_images: Array, normalization: tuple[str, str] | None) -> Array:
  if normalization is None:
    return batch_images
  return images_lib.normalize(batch_images.astype(jnp.float32), *normalization)


def train_step(
  state: TrainState,
  batch: dict[str, Array],
  *,
  learning_rate_fn: optax.Schedule,
  label_smoothing: float,
  ema_decay: float,
  normalization: tuple[str, str] | None = None,
  ema_warmup: bool = True,
  per_device_batch_stats: bool = False,
) -> tuple[TrainState, dict[str, Array]]:
  """One per-device step (named axis `parallel.AXIS`); state in and out identical on every device.

  `normalization` (source, target) converts the images first (see `images.normalize`).
  `per_device_batch_stats`: the model's BatchNorm normalises each device's examples alone (PyTorch
  DDP's); the running statistics are then averaged over devices after the step.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.dropout_rng, state.step), parallel.device_index())
  batch_images = _convert(batch['image'], normalization)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch_images,
      train=True,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    return cross_entropy_loss(logits, batch['label'], label_smoothing), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(parallel.varying(state.params))
  grads = lax.pmean(grads, parallel.AXIS)
  if per_device_batch_stats:
    batch_stats = lax.pmean(batch_stats, parallel.AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  decay = ema_decay_at(state.step, ema_decay, ema_warmup)
  average = lambda ema, new: jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, ema, new)
  new_state = new_state.replace(
    ema_params=average(state.ema_params, new_state.params),
    ema_batch_stats=average(state.ema_batch_stats, new_state.batch_stats),
  )
  metrics = lax.pmean({'loss': loss, 'top1': jnp.mean(topk_correct(logits, batch['label'], 1))}, parallel.AXIS)
  metrics.update(
    learning_rate=learning_rate_fn(state.step),
    grad_norm=optax.tree.norm(grads),
    param_norm=optax.tree.norm(new_state.params),
  )
  return new_state, metrics


def eval_step(
  variables: Any, batch: dict[str, Array], *, apply_fn: Callable[..., Any], normalization: tuple[str, str] | None = None
) -> dict[str, Array]:
  """Sums over all devices of loss, top-1 and top-5 hits and counted examples (padding masked out)."""
  logits, _ = apply_fn(variables, _convert(batch['image'], normalization), train=False)
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


def create_train_state(rng: Array, model: Any, image_size: int, tx: optax.GradientTransformation) -> TrainState:
  """Fresh state; the EMA starts at the initial weights."""
  init_rng, dropout_rng = jax.random.split(rng)
  example = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = run_once.jit(functools.partial(model.init, train=False))(init_rng, example)
  unknown = sorted(set(variables) - {'params', 'batch_stats'})
  if unknown:
    raise ValueError(f'the train loop handles params and batch_stats only; the model also has {unknown}')
  # TrainState.create would run tx.init eagerly: one small program per parameter shape (slow to compile
  # on a GPU, see supernet_store.create_block_state); jitted it is one.
  return TrainState(
    step=0,
    apply_fn=model.apply,
    params=variables['params'],
    tx=tx,
    opt_state=run_once.jit(tx.init)(variables['params']),
    batch_stats=variables['batch_stats'],
    ema_params=variables['params'],
    ema_batch_stats=variables['batch_stats'],
    dropout_rng=dropout_rng,
  )


def variables_of(state: TrainState, ema: bool) -> dict[str, Any]:
  """The model variables of `state`: its EMA ones or the trained ones."""
  return {
    'params': state.ema_params if ema else state.params,
    'batch_stats': state.ema_batch_stats if ema else state.batch_stats,
  }


def parallel_eval(
  mode: str, apply_fn: Callable[..., Any], normalization: tuple[str, str] | None = None
) -> Callable[[Any, Any], dict[str, Array]]:
  """`eval_step` over all devices; takes unreplicated variables and a `parallel.shard_batch` batch."""
  step = functools.partial(eval_step, apply_fn=apply_fn, normalization=normalization)
  if mode == 'pmap':
    return jax.pmap(step, axis_name=parallel.AXIS, in_axes=(None, 0), out_axes=None)
  mapped = jax.shard_map(step, mesh=parallel.make_mesh(), in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  return jax.jit(mapped)


def evaluate_batches(
  eval_fn: Callable[[Any, Any], dict[str, Array]], variables: Any, batches: Iterable[HostBatch], mode: str
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


def device_batches(batches: Iterator[HostBatch], mode: str, size: int = 2) -> Iterator[Any]:
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


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Data:
  """Where a training run's batches come from.

  `train(start_step)` yields host batches (local_devices, per_device, ...) from that step on;
  `eval()` one pass of the eval split (or None: no evaluation); `normalization` is what the
  batches' images hold (images_lib.NORMALIZATIONS).
  """

  train: Callable[[int], Iterator[HostBatch]]
  eval: Callable[[], Iterable[HostBatch]] | None
  steps_per_epoch: int
  image_size: int
  normalization: str


def dataset(data_config: ml_collections.ConfigDict, tc: ml_collections.ConfigDict) -> Data:
  """The tfds 'train' and 'eval' splits of `data_config` at the trainer section's batch size."""
  steps = int(tc.steps_per_epoch)
  if not steps:
    examples = input_pipeline.num_examples(data_config, 'train')
    if not examples:
      raise ValueError('cannot tell the size of the training split: set steps_per_epoch in the config')
    steps = max(1, examples // tc.batch_size)
  return Data(
    train=lambda start: input_pipeline.create_split(data_config, 'train', tc.batch_size, start_step=start),
    eval=lambda: input_pipeline.create_split(data_config, 'eval', tc.batch_size),
    steps_per_epoch=steps,
    image_size=data_config.image_size,
    normalization=images_lib.check_normalization(data_config.normalization, 'data.normalization'),
  )


# ----------------------------------------------------------------------------- the train loop


@dataclasses.dataclass
class _Run:
  """What the loop's helpers share: the recipe, the run's files and its running record."""

  tc: ml_collections.ConfigDict
  root: epath.Path
  manager: Any
  writer: Any
  report: Any
  meta: dict[str, Any]
  steps_per_epoch: int
  started: float = dataclasses.field(default_factory=time.time)
  elapsed_before: float = 0.0
  window: list[tuple[int, Any]] = dataclasses.field(default_factory=list)

  def elapsed(self) -> float:
    return self.elapsed_before + time.time() - self.started


def _flush(run: _Run, step: int) -> None:
  """Fetches the pending metrics, checks them and logs their means."""
  fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(run.window)]
  run.window.clear()
  check_finite(fetched)
  if fetched:
    means = {f'train/{k}': float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    run.writer.write_scalars(step, means)


def _save(run: _Run, state: TrainState, step: int) -> None:
  _flush(run, step)
  run.meta['elapsed_seconds'] = run.elapsed()
  if step not in run.manager.all_steps():
    checkpoints.save(run.manager, step, state, run.meta)


def _evaluate(run: _Run, state: TrainState, step: int, eval_fn, data: Data, mode: str, on_best) -> dict[str, Any]:
  """Evaluates the EMA and the raw weights, records the result and calls `on_best` on a new best top-1."""
  with run.report.timed('eval'):
    result = {
      name: evaluate_batches(eval_fn, variables_of(state, name == 'ema'), data.eval(), mode) for name in ('ema', 'raw')
    }
  run.writer.write_scalars(step, {f'eval/{n}_{k}': v for n, r in result.items() for k, v in r.items()})
  weights = max(result, key=lambda n: result[n]['top1'])
  record = {'step': step, 'epoch': step / run.steps_per_epoch, **result}
  run.meta['evals'].append(record)
  best = run.meta['best']
  if best is None or result[weights]['top1'] > best['top1']:
    run.meta['best'] = {
      'step': step,
      'weights': weights,
      'top1': result[weights]['top1'],
      'top5': result[weights]['top5'],
    }
    if on_best is not None:
      on_best(parallel.host_copy(variables_of(state, weights == 'ema')), run.meta['best'])
  logging.info(
    'Eval at step %d: EMA top-1 %.2f%% top-5 %.2f%% | raw top-1 %.2f%% top-5 %.2f%%',
    step,
    *(100 * result[n][k] for n in ('ema', 'raw') for k in ('top1', 'top5')),
  )
  return record


def train_and_evaluate(
  model: Any,
  tc: ml_collections.ConfigDict,
  directory: str | os.PathLike[str],
  data: Data,
  *,
  seed: int,
  model_normalization: str | None = None,
  on_best: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
  init_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """Trains `model` (BatchNorm over `parallel.AXIS`) as the trainer section `tc` says; resumes from `directory`.

  `model_normalization`: what the model reads (default: what the data holds; images are converted on
  device). `on_best(variables, best)` runs on every process each time the eval top-1 improves;
  `init_fn(variables)` replaces the initial variables of a fresh (not a resumed) run. Returns the
  final state and {'steps', 'elapsed_seconds', 'final': the last eval, 'best'}.
  """
  root = epath.Path(os.fspath(directory))
  mode = tc.parallel
  parallel.check_global_batch(tc.batch_size, 'batch_size')
  target = model_normalization or data.normalization
  normalization = None if target == data.normalization else (data.normalization, target)
  total_steps = epochs_to_steps(tc.epochs, data.steps_per_epoch)
  eval_every = epochs_to_steps(tc.eval_every_epochs, data.steps_per_epoch) if data.eval else 0
  learning_rate_fn = create_learning_rate_fn(tc, data.steps_per_epoch)
  state = create_train_state(jax.random.PRNGKey(seed), model, data.image_size, create_optimizer(tc, learning_rate_fn))
  manager = checkpoints.manager(root / 'checkpoints', tc.keep_checkpoints)
  meta: dict[str, Any] = {'elapsed_seconds': 0.0, 'best': None, 'evals': []}
  restored = checkpoints.restore_latest(manager, parallel.host_copy(state), os.fspath(root / 'checkpoints'))
  if restored is not None:
    state, meta = restored
    logging.info('Resumed from %s at step %d of %d.', root / 'checkpoints', int(state.step), total_steps)
  else:
    if init_fn is not None:
      variables = init_fn(variables_of(state, ema=False))
      state = state.replace(
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        ema_params=variables['params'],
        ema_batch_stats=variables['batch_stats'],
        opt_state=run_once.jit(state.tx.init)(variables['params']),
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
      ema_warmup=tc.ema_warmup,
      per_device_batch_stats=getattr(model, 'bn_axis_name', parallel.AXIS) is None,
    ),
    mode,
    donate_state=mode == 'shard_map',
  )
  eval_fn = parallel_eval(mode, model.apply, normalization)
  writer = metric_writers.create_default_writer(os.fspath(root / 'tb'), just_logging=jax.process_index() > 0)
  run = _Run(
    tc,
    root,
    manager,
    writer,
    periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer),
    meta,
    data.steps_per_epoch,
    elapsed_before=float(meta['elapsed_seconds']),
  )
  try:
    with checkpoints.Preemption() as preemption:
      batches = device_batches(data.train(start), mode)
      for step in range(start + 1, total_steps + 1):
        state, metrics = p_step(state, next(batches))
        run.window.append((step, metrics))
        parallel.wait_for_steps_in_flight(run.window)
        run.report(step)
        if step % tc.log_every_steps == 0:
          _flush(run, step)
        if eval_every and step % eval_every == 0 and step != total_steps:
          _evaluate(run, state, step, eval_fn, data, mode, on_best)
        if step % tc.checkpoint_every_steps == 0:
          _save(run, state, step)
        if preemption.check(step, manager):
          _save(run, state, step)
          manager.wait_until_finished()
          raise SystemExit(f'Preempted at step {step}: checkpoint saved in {root / "checkpoints"}; rerun to resume.')
    final_eval = None
    if data.eval is not None:
      last = meta['evals'][-1] if meta['evals'] else None
      final_eval = (
        last
        if last and last['step'] == total_steps
        else _evaluate(run, state, total_steps, eval_fn, data, mode, on_best)
      )
    _save(run, state, total_steps)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  results = {
    'steps': total_steps,
    'elapsed_seconds': round(run.elapsed(), 1),
    'final': final_eval,
    'best': meta['best'],
  }
  return state, results
