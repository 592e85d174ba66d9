"""Retraining: learning, EMA, resume, pmap/shard_map/1-device parity, schedule, supernet init, export."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dna_jax import checkpoints
from dna_jax import config_base
from dna_jax import images as images_lib
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import trainer
from dna_jax.models import child
from dna_jax.models import layers
from dna_jax.stages import export as export_stage
from dna_jax.stages import retrain

IMAGE = 16
CLASSES = 6
ARCH = space_lib.from_string('8,8,32|8s2:k3e3/16s2:k3e6')


def make_config(**overrides):
  config = config_base.get_base_config()
  config.retrain.update(
    dict(
      batch_size=16,
      epochs=3,
      steps_per_epoch=4,
      base_learning_rate=8.0,
      warmup_epochs=0,
      dropout_rate=0.0,
      drop_connect_rate=0.0,
      label_smoothing=0.1,
      ema_decay=0.15,
      log_every_steps=1,
      checkpoint_every_steps=100,
      eval_every_epochs=1,
    )
  )
  config.retrain.update(overrides)
  return config


# Fast-moving BatchNorm statistics so that a few steps show in inference mode.
# Native depthwise convs compile faster on CPU than the default shift-and-add.
CONVENTIONS = layers.Conventions(bn_momentum=0.5, depthwise='native')


def make_model(axis=parallel.AXIS, dropout=0.0):
  return child.ChildNet(ARCH, CLASSES, dropout, dropout, stem_stride=2, conventions=CONVENTIONS, bn_axis_name=axis)


def fixed_batches(start_step, devices=8):
  """Two alternating fixed batches: the one for step s depends only on s."""
  step = start_step
  while True:
    rng = np.random.default_rng(step % 2)
    yield {
      'image': rng.normal(size=(devices, 16 // devices, IMAGE, IMAGE, 3)).astype(np.float32),
      'label': rng.integers(0, CLASSES, (devices, 16 // devices)).astype(np.int32),
    }
    step += 1


def eval_batches():
  return [next(fixed_batches(0)), next(fixed_batches(1))]


def train(workdir, config, eval_batches=None, **kwargs):
  data = trainer.Data(fixed_batches, eval_batches, config.retrain.steps_per_epoch, IMAGE, 'imagenet')
  return trainer.train_and_evaluate(make_model(), config.retrain, str(workdir), data, seed=0, **kwargs)


def assert_trees_equal(a, b, **tolerance):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tolerance:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def whole_run(tmp_path_factory):
  """12 uninterrupted steps (3 epochs of 4 steps), evaluated after each epoch, and the initial eval."""
  workdir = tmp_path_factory.mktemp('whole')
  config = make_config()
  fresh = trainer.create_train_state(jax.random.PRNGKey(0), make_model(), IMAGE, optax.sgd(0.1))
  initial = trainer.evaluate_batches(
    trainer.parallel_eval('pmap', fresh.apply_fn), trainer.variables_of(fresh, ema=False), eval_batches(), 'pmap'
  )
  saved = []
  state, results = train(workdir, config, eval_batches=eval_batches, on_best=lambda v, best: saved.append(best))
  return {'workdir': workdir, 'config': config, 'state': state, 'results': results, 'initial': initial, 'saved': saved}


def test_training_reduces_the_loss_and_keeps_the_best(whole_run):
  initial, results = whole_run['initial'], whole_run['results']
  final = results['final']['raw']
  assert initial['count'] == final['count'] == 32
  assert final['loss'] < 0.5 * initial['loss'], (initial, final)
  assert final['top1'] > initial['top1'], (initial, final)
  manager = ocp.CheckpointManager(whole_run['workdir'] / 'checkpoints')
  assert manager.all_steps() == [12]
  meta = manager.restore(12, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  assert [e['step'] for e in meta['evals']] == [4, 8, 12] and meta['evals'][-1] == results['final']
  best = results['best']
  assert best['top1'] == max(e[w]['top1'] for e in meta['evals'] for w in ('ema', 'raw'))
  first_best = next(e for e in meta['evals'] if max(e['ema']['top1'], e['raw']['top1']) == best['top1'])
  assert best['step'] == first_best['step'] and first_best[best['weights']]['top1'] == best['top1']
  assert whole_run['saved'][-1] == results['best']


def test_resume_equals_uninterrupted(whole_run, tmp_path, monkeypatch):
  config, whole = whole_run['config'], whole_run['state']
  monkeypatch.setattr(ocp.CheckpointManager, 'reached_preemption', lambda self, step: step == 6)
  with pytest.raises(SystemExit, match='Preempted at step 6'):
    train(tmp_path, config, eval_batches=eval_batches)
  monkeypatch.undo()
  resumed, results = train(tmp_path, config, eval_batches=eval_batches)
  assert int(whole.step) == int(resumed.step) == 12
  for field in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
    assert_trees_equal(parallel.host_copy(getattr(whole, field)), parallel.host_copy(getattr(resumed, field)))
  assert results['best'] == whole_run['results']['best']


def test_a_training_loop_waits_until_at_most_two_steps_are_unfinished():
  """So progress reports count finished steps: JAX would otherwise run ahead until the next metrics fetch."""
  slow_step = jax.jit(lambda x: functools.reduce(lambda y, _: jnp.tanh(y @ y), range(20), x))
  x = jnp.full((600, 600), 1e-3, jnp.float32)
  pending = []
  for step in range(1, 6):
    x = slow_step(x)
    pending.append((step, {'x': x}))
    parallel.wait_for_steps_in_flight(pending)
    assert all(m['x'].is_ready() for s, m in pending if s <= step - parallel.STEPS_IN_FLIGHT), step
  jax.block_until_ready(x)


def test_pmap_shard_map_and_one_device_give_the_same_update_and_ema():
  tc = make_config().retrain
  lr_fn = trainer.create_learning_rate_fn(tc, 4)
  tx = trainer.create_optimizer(tc, lr_fn)
  state = trainer.create_train_state(jax.random.PRNGKey(2), make_model(), IMAGE, tx)
  step = functools.partial(trainer.train_step, learning_rate_fn=lr_fn, label_smoothing=0.1, ema_decay=tc.ema_decay)
  batch = next(fixed_batches(0))
  one_device = jax.pmap(
    step, axis_name=parallel.AXIS, in_axes=(None, 0), out_axes=None, devices=jax.local_devices()[:1]
  )
  p_step = parallel.data_parallel(step, 'pmap')
  results = {
    'pmap': p_step(parallel.replicate(state, 'pmap'), batch),
    'shard_map': parallel.data_parallel(step, 'shard_map')(
      parallel.replicate(state, 'shard_map'), parallel.shard_batch(batch, 'shard_map')
    ),
  }
  reference, metrics = one_device(state, jax.tree.map(lambda x: x.reshape((1, -1) + x.shape[2:]), batch))
  assert not np.allclose(jax.tree.leaves(reference.params)[0], jax.tree.leaves(state.params)[0])
  for new_state, new_metrics in results.values():
    for field in ('params', 'batch_stats'):
      assert_trees_equal(
        parallel.host_copy(getattr(new_state, field)),
        parallel.host_copy(getattr(reference, field)),
        rtol=2e-5,
        atol=2e-6,
      )
    np.testing.assert_allclose(float(new_metrics['loss']), float(metrics['loss']), rtol=1e-5)

  # EMA: TF ExponentialMovingAverage(0.15, num_updates=t) decays by min(0.15, (1 + t) / (10 + t)) = 0.1, 0.15.
  first = results['pmap'][0]
  second, _ = p_step(first, next(fixed_batches(1)))
  params = [parallel.host_copy(s.params) for s in (state, first, second)]
  expected = jax.tree.map(lambda p0, p1, p2: 0.15 * (0.1 * p0 + 0.9 * p1) + 0.85 * p2, *params)
  assert_trees_equal(parallel.host_copy(second.ema_params), expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(second.ema_params)[0], jax.tree.leaves(second.params)[0])


def test_per_device_batchnorm_averages_each_devices_statistics():
  """model.bn_sync='device' (the authors' DDP retraining): each device normalises its own examples."""
  tc = make_config().retrain
  lr_fn = trainer.create_learning_rate_fn(tc, 4)
  model = make_model(axis=None)
  state = trainer.create_train_state(jax.random.PRNGKey(2), model, IMAGE, trainer.create_optimizer(tc, lr_fn))
  step = functools.partial(
    trainer.train_step, learning_rate_fn=lr_fn, label_smoothing=0.1, ema_decay=0.5, per_device_batch_stats=True
  )
  batch = next(fixed_batches(0))
  new, _ = parallel.data_parallel(step, 'pmap')(parallel.replicate(state, 'pmap'), batch)
  # Running statistics: the mean over devices of what each device's 2 examples alone give.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  per_device = [
    model.apply(variables, batch['image'][d], train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})[
      1
    ]
    for d in range(8)
  ]
  expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *[p['batch_stats'] for p in per_device])
  assert_trees_equal(parallel.host_copy(new.batch_stats), expected, rtol=1e-4, atol=1e-5)
  synced, _ = parallel.data_parallel(functools.partial(step, per_device_batch_stats=False), 'pmap')(
    parallel.replicate(trainer.create_train_state(jax.random.PRNGKey(2), make_model(), IMAGE, state.tx), 'pmap'),
    batch,
  )
  assert not np.allclose(jax.tree.leaves(synced.batch_stats)[1], jax.tree.leaves(new.batch_stats)[1], atol=1e-4)
  config = make_config()
  config.model.bn_sync = 'device'
  assert child.child_for_training(ARCH, CLASSES, config, parallel.AXIS).bn_axis_name is None


def test_ema_decay_with_and_without_warm_up():
  steps = jnp.arange(4)
  np.testing.assert_allclose(trainer.ema_decay_at(steps, 0.9998), [0.1, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
  np.testing.assert_allclose(trainer.ema_decay_at(steps, 0.9998, warmup=False), [0.9998] * 4, rtol=1e-7)


def test_learning_rate_schedule_matches_efficientnet():
  tc = make_config(batch_size=512, base_learning_rate=0.016, warmup_epochs=5, lr_decay_epochs=2.4).retrain
  lr_fn = trainer.create_learning_rate_fn(tc, 10)  # peak 0.032, warm-up 50 steps, decay every 24 steps
  np.testing.assert_allclose(
    [float(lr_fn(s)) for s in (0, 25, 49, 50, 71, 72, 100)],
    [0.0, 0.016, 0.032 * 49 / 50, 0.032 * 0.97**2, 0.032 * 0.97**2, 0.032 * 0.97**3, 0.032 * 0.97**4],
    rtol=1e-6,
  )
  assert trainer.epochs_to_steps(2.4, 10) == 24


def test_weight_decay_skips_batchnorm_and_biases():
  params = jax.eval_shape(lambda: make_model().init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3))))
  mask = trainer.kernel_mask(params['params'])
  assert mask['head']['classifier']['kernel'] and not mask['head']['classifier']['bias']
  assert not mask['stem']['bn']['scale'] and mask['block1_layer0']['dwconv']['kernel']


def test_nan_guard_names_the_first_bad_step():
  window = [
    (7, {'loss': 1.0, 'grad_norm': 2.0}),
    (8, {'loss': 1.0, 'grad_norm': float('inf')}),
    (9, {'loss': float('nan'), 'grad_norm': 1.0}),
  ]
  trainer.check_finite(window[:1])
  with pytest.raises(FloatingPointError, match='non-finite grad_norm at step 8'):
    trainer.check_finite(window)


def test_init_from_supernet_copies_the_chosen_paths(tmp_path):
  """Fake distillation checkpoints in distill.py's layout: WORKDIR/distill/block_K, cells as 'cellC'."""
  variables = child.init_child(make_model(None), jax.random.PRNGKey(0), IMAGE)
  ones = lambda tree: jax.tree.map(np.ones_like, tree)
  # Block 2's supernet cell reads a 12-wide teacher feature where the child's block 1 gives 8 channels.
  wrong_in = child.init_child(
    child.ChildNet(space_lib.from_string('8,8,32|12s2:k3e3/16s2:k3e6'), CLASSES), jax.random.PRNGKey(1), IMAGE
  )
  op = space_lib.OP_NAMES[ARCH.blocks[1].ops[0]]
  cells = [
    (
      0,
      {
        c: {
          'stem': ones(variables[c]['stem']),
          'ds': ones(variables[c]['ds']),
          'layer0': {'k3e3': ones(variables[c]['block1_layer0'])},
        }
        for c in variables
      },
    ),
    (1, {c: {'layer0': {op: ones(wrong_in[c]['block2_layer0'])}} for c in variables}),
  ]
  space = space_lib.parse_space('2 12 1@8; 2 20 1@12,1@16', stem_width=8, ds_width=8, head_width=32)
  for k, (cell_index, cell) in enumerate(cells):
    state = {
      'step': np.int32(5),
      'params': {f'cell{cell_index}': cell['params']},
      'batch_stats': {f'cell{cell_index}': cell['batch_stats']},
    }
    with ocp.CheckpointManager(tmp_path / 'distill' / f'block_{k + 1}') as manager:
      manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({})))
  new = retrain.init_from_supernet(variables, ARCH, str(tmp_path), space=space)
  assert np.all(new['params']['block1_layer0']['dwconv']['kernel'] == 1)
  assert np.all(new['batch_stats']['stem']['bn']['var'] == 1)
  # Block 2's first layer has 12 inputs in the supernet, 8 in the child: its expanded convs keep their init.
  np.testing.assert_array_equal(
    new['params']['block2_layer0']['dwconv']['kernel'], variables['params']['block2_layer0']['dwconv']['kernel']
  )
  assert np.all(new['params']['block2_layer0']['project_bn']['bias'] == 1)  # same shape: copied
  np.testing.assert_array_equal(new['params']['head']['conv']['kernel'], variables['params']['head']['conv']['kernel'])
  with pytest.raises(FileNotFoundError, match='no distilled checkpoint'):
    retrain.init_from_supernet(variables, ARCH, str(tmp_path / 'elsewhere'), space=space)


def test_normalizations_round_trip():
  images = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
  for target in images_lib.NORMALIZATIONS:
    back = images_lib.normalize(images_lib.normalize(images, 'raw', target), target, 'raw')
    np.testing.assert_allclose(back, images, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    images_lib.normalize(images, 'raw', 'imagenet')[..., 0],
    (images[..., 0] / 255 - 0.485) / 0.229,
    rtol=1e-5,
    atol=1e-5,
  )


def test_child_checkpoint_round_trip_and_export_equivalence(tmp_path):
  import tensorflow as tf

  size = 8  # The last block runs on 1x1 maps, a case TFLite's converter needs help with.
  model = make_model(None)
  variables = child.init_child(model, jax.random.PRNGKey(3), size)
  # Non-trivial BatchNorm statistics so that inference mode matters.
  variables['batch_stats'] = jax.tree.map(lambda x: x + 0.3, variables['batch_stats'])
  meta = checkpoints.child_meta(ARCH, CLASSES, size, model.conventions, 'imagenet')
  checkpoints.save_child(str(tmp_path / 'ckpt'), variables, meta)
  loaded_model, loaded, loaded_meta = checkpoints.load_child(str(tmp_path / 'ckpt'))
  assert loaded_meta == meta
  assert_trees_equal(loaded, variables)
  other = checkpoints.child_meta(
    space_lib.from_string('8,8,32|8s2:k3e3/16s2:k5e6'), CLASSES, size, model.conventions, 'imagenet'
  )
  (tmp_path / 'ckpt' / 'meta.json').write_text(json.dumps(other))
  with pytest.raises(ValueError, match=r'block2_layer0/dwconv/kernel is \(3, 3, 1, 48\).*needs \(5, 5, 1, 48\)'):
    checkpoints.load_child(str(tmp_path / 'ckpt'))

  pixels = np.random.default_rng(4).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
  expected = np.asarray(model.apply(variables, images_lib.normalize(pixels, 'raw', 'imagenet'), train=False)[0])
  saved_model = export_stage.export(
    loaded_model, loaded, size, str(tmp_path / 'sm'), 'saved_model', normalization='imagenet'
  )
  serve = tf.saved_model.load(saved_model).signatures['serving_default']
  np.testing.assert_allclose(serve(images=tf.constant(pixels))['logits'].numpy(), expected, atol=1e-4)

  tflite = export_stage.export(
    loaded_model, loaded, size, str(tmp_path / 'model.tflite'), 'tflite', normalization='imagenet'
  )
  interpreter = tf.lite.Interpreter(model_path=tflite)
  interpreter.allocate_tensors()
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  assert tuple(inp['shape']) == (1, size, size, 3)
  for i in range(len(pixels)):
    interpreter.set_tensor(inp['index'], pixels[i : i + 1])
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(out['index'])[0], expected[i], atol=1e-4)
