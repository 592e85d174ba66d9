"""Distillation: learning, one compile for all paths, per-device paths, resume, independence, NaN guard."""

import collections
import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dna_jax import config_base
from dna_jax import distill_steps
from dna_jax import images as images_lib
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.models import supernet
from dna_jax.stages import distill

IMAGE = 16
SPACE = '2 16 1@8,2@8; 2 24 1@12; 1 32 1@16'


def make_config(**distill_overrides):
  config = config_base.get_base_config()
  config.space.blocks = SPACE
  config.space.stem_width, config.space.ds_width, config.space.head_width = 8, 8, 32
  config.space.stem_stride = 1  # the tiny teacher's
  config.teacher.variant = 'tiny'
  config.data.image_size = IMAGE
  config.distill.update(
    dict(
      epochs=1,
      batch_size=16,
      learning_rates='0.01',
      checkpoint_every_steps=2,
      log_every_steps=1,
      keep_checkpoints=3,
      programs='step',  # one program: fewer compiles in these tests (tests/test_distill_steps.py: 'layer')
    )
  )
  config.distill.update(distill_overrides)
  return config


@pytest.fixture(scope='module')
def tiny_teacher():
  model = efficientnet.variant('tiny', num_classes=10)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, IMAGE, IMAGE, 3)), train=False))(jax.random.PRNGKey(7))
  return model, variables


def fixed_batches(start_step, images=None):
  """Batch for step s depends only on s: a resumed stream equals an uninterrupted one."""
  step = start_step
  while True:
    step += 1
    rng = np.random.default_rng(step)
    image = images if images is not None else rng.uniform(0, 255, (8, 2, IMAGE, IMAGE, 3)).astype(np.float32)
    yield {'image': image, 'label': np.zeros((8, 2), np.int32)}


def train(config, workdir, teacher, steps, data=fixed_batches):
  space = space_lib.space_from_config(config.space)
  return distill.train_blocks(config, str(workdir), teacher[0], teacher[1], space, data, steps)


def restore_block(config, workdir, block, teacher):
  space = space_lib.space_from_config(config.space)
  cells = supernet.supernet_cells(space, stem_stride=1)
  manager = supernet_store.block_manager(str(workdir), block - 1, config.distill.keep_checkpoints)
  size = space_lib.supernet_input_sizes(space, IMAGE, 1)[block - 1]
  tx = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, 100), 1e-4)
  target = supernet_store.abstract_block_state(tuple(cells[block - 1]), size, tx)
  state, meta = supernet_store.restore_block(manager, target, block - 1)
  manager.close()
  return state, meta


def test_supernet_init_shares_a_program_per_link_and_equals_flax_init_module_by_module():
  cells = supernet.supernet_cells(space_lib.parse_space('2 16 1@8,2@8; 2 24 2@12,3@12', 8, 8), stem_stride=1)
  block, size = cells[1], 8  # cell0: layers 16->12 (stride 2), 12->24; cell1: 16->12, 12->12, 12->24

  def flax_init(cell, rng, x):  # each module's own flax init, inputs passed on by its forward
    params, stats = {}, {}
    for name, modules, _ in cell.units():
      params[name], stats[name] = {}, {}
      for op, module in zip(space_lib.OP_NAMES, modules):
        rng, key = jax.random.split(rng)
        variables = module.init(key, x)
        params[name][op], stats[name][op] = variables['params'], variables['batch_stats']
      x = modules[-1].apply(variables, x)
    return {'params': params, 'batch_stats': stats}

  supernet._init_program.cache_clear()
  variables = [
    cell.init(jax.random.PRNGKey(c), supernet.zeros_like_input(cell, 1, size)) for c, cell in enumerate(block)
  ]
  assert supernet._init_program.cache_info().misses == 3  # 5 links, 3 distinct (modules, input shape)
  for c, cell in enumerate(block):
    expected = jax.jit(functools.partial(flax_init, cell))(jax.random.PRNGKey(c), jnp.zeros((1, size, size, 16)))
    assert jax.tree.structure(variables[c]) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, variables[c], expected)
  stem_cell = cells[0][1]
  variables = stem_cell.init(jax.random.PRNGKey(5), supernet.zeros_like_input(stem_cell, 1, 8))
  assert set(variables['params']) == {'stem', 'ds', 'layer0', 'layer1'}
  assert variables['params']['stem']['conv']['kernel'].shape[:3] == (3, 3, 3)


@pytest.mark.parametrize('make_key', [jax.random.PRNGKey, jax.random.key])
def test_link_initialisers_compiled_ahead_in_threads_are_the_ones_init_calls(make_key):
  cells = supernet.supernet_cells(space_lib.parse_space('2 16 1@8,2@8; 2 24 2@12,3@12', 8, 8), stem_stride=1)
  pairs = [(cell, 8) for cell in cells[1]] + [(cells[0][1], 8)]
  supernet._init_program.cache_clear()
  count = supernet.compile_link_inits(pairs, make_key(0), threads=2)
  assert count == supernet._init_program.cache_info().misses == 7  # block 2's 3 link shapes, stem cell's 4
  links = {link for cell, size in pairs for link in supernet.link_inputs(cell, size)}
  programs = [supernet._init_program(*link) for link in links]
  assert [init.cache_size() for init, _ in programs] == [1] * count  # each compiled once, by running it
  for c, (cell, size) in enumerate(pairs):
    cell.init(jax.random.fold_in(make_key(1), c), supernet.zeros_like_input(cell, 1, size))
  assert supernet._init_program.cache_info().misses == count
  assert [init.cache_size() for init, _ in programs] == [1] * count  # the same keys' type: nothing retraced


def test_loss_decreases_for_every_cell(tmp_path, tiny_teacher, monkeypatch):
  # One fixed batch and one fixed path per cell: every cell must fit it better after a few steps.
  # (seed=1 gives this run its own compiled step, traced with the fixed path.)
  config = make_config(learning_rates='0.05')
  config.seed = 1
  monkeypatch.setattr(
    distill_steps, 'sample_path', lambda rng, step, cell, sampling: jnp.zeros((cell.layers,), jnp.int32)
  )
  image = np.random.default_rng(0).uniform(0, 255, (8, 2, IMAGE, IMAGE, 3)).astype(np.float32)
  train(config, tmp_path, tiny_teacher, 12, functools.partial(fixed_batches, images=image))
  history = json.loads((tmp_path / 'distill' / 'history.json').read_text())
  first, last = history[0][1], history[-1][1]
  keys = [k for k in first if k.endswith('/mse')]
  assert len(keys) == 4  # block1: 2 cells, block2: 1, block3: 1
  for key in keys:
    assert last[key] < 0.8 * first[key], (key, first[key], last[key])
  assert (tmp_path / 'distill' / 'loss_curves.png').exists()


def test_one_compilation_serves_every_path_and_devices_differ():
  traces = []

  def sampled_paths(state, batch):
    traces.append(1)
    rng = jax.random.fold_in(jax.random.PRNGKey(0), parallel.device_index())
    path = distill_steps.sample_path(rng, state, space_lib.Cell(3, 8, 1), 'uniform')
    return state, jax.lax.all_gather(path, parallel.AXIS)

  step = parallel.data_parallel(sampled_paths, 'pmap')
  seen = set()
  for s in range(5):
    _, paths = step(jnp.int32(s), np.zeros((8, 1)))
    seen.update(tuple(map(tuple, np.asarray(paths))))
  assert len(traces) == 1
  assert len(seen) > 8  # devices and steps draw different paths


def test_each_candidate_op_is_traced_once_per_input_shape(monkeypatch):
  """Differentiating two cells whose first and last layers share shapes traces each op once per shape (its
  forward and its gradient)."""
  space = space_lib.parse_space('2 16 2@8,3@8', 8, 8)
  cells = supernet.supernet_cells(space, stem_stride=1)[0]
  candidates = {cell.op_module(l, j) for cell in cells for l in range(cell.cell.layers) for j in range(6)}
  traced = collections.Counter()
  original = supernet.apply_module

  def counting_apply(module, params, batch_stats, x, train):
    if module in candidates:
      traced[(module, x.shape)] += 1
    return original(module, params, batch_stats, x, train)

  x = jnp.ones((2, IMAGE, IMAGE, 3))
  variables = [cell.init(jax.random.PRNGKey(c), x) for c, cell in enumerate(cells)]

  def loss(params):
    total = 0.0
    for cell, v, path in zip(cells, variables, ([0, 5], [3, 1, 4])):
      y, _ = cell.apply({'params': params[cell.cell.layers], 'batch_stats': v['batch_stats']}, x, jnp.array(path), True)
      total = total + jnp.sum(y * y)
    return total

  caches = (supernet.candidate_op_forward, supernet.candidate_op_gradient)
  for cache in caches:
    cache.cache_clear()
  monkeypatch.setattr(supernet, 'apply_module', counting_apply)
  try:
    jax.make_jaxpr(jax.grad(loss))({cell.cell.layers: v['params'] for cell, v in zip(cells, variables)})
  finally:
    for cache in caches:  # they hold functions built on the counting apply_module
      cache.cache_clear()
  # 5 layers, 3 distinct (op modules, input shape): both cells' first layers match, and their last layers;
  # each traced once for the forward and once for its gradient
  assert len(traced) == 3 * 6 and set(traced.values()) == {2}


def test_pinned_layers_always_draw_their_op():
  cell = space_lib.parse_space('2 16 3@8=k5e6-*-k3e3').blocks[0].cells[0]
  for sampling in ('uniform', 'fair'):
    paths = np.stack(
      [np.asarray(distill_steps.sample_path(jax.random.PRNGKey(s), jnp.int32(s), cell, sampling)) for s in range(24)]
    )
    assert set(paths[:, 0]) == {space_lib.op_index('k5e6')} and set(paths[:, 2]) == {space_lib.op_index('k3e3')}
    assert set(paths[:, 1]) == set(range(6))  # the free layer still draws every op


def test_fair_sampling_draws_every_op_once_per_cycle():
  rng = jax.random.PRNGKey(3)
  paths = np.stack([np.asarray(supernet.fair_path(rng, jnp.int32(s), 4)) for s in range(12)])
  for cycle in (paths[:6], paths[6:]):
    for layer in range(4):
      assert sorted(cycle[:, layer]) == list(range(6))


def test_distill_step_is_one_compile_for_many_steps(tmp_path, tiny_teacher):
  config = make_config()
  config.seed = 2  # a configuration no other test compiled
  counter = []
  original = distill_steps.distill_step

  def counting_step(*args, **kwargs):
    counter.append(1)
    return original(*args, **kwargs)

  distill_steps.distill_step = counting_step
  try:
    train(config, tmp_path, tiny_teacher, 4)
  finally:
    distill_steps.distill_step = original
  assert len(counter) == 1


def test_resume_equals_uninterrupted(tmp_path, tiny_teacher):
  config = make_config(epochs=2)
  train(config, tmp_path / 'straight', tiny_teacher, 2)
  # An interrupted run: 1 epoch of 2 steps (checkpointed at step 2), then the same command to 4.
  train(make_config(epochs=1), tmp_path / 'resumed', tiny_teacher, 2)
  train(config, tmp_path / 'resumed', tiny_teacher, 2)
  for block in (1, 2, 3):
    a, _ = restore_block(config, tmp_path / 'straight', block, tiny_teacher)
    b, _ = restore_block(config, tmp_path / 'resumed', block, tiny_teacher)
    assert int(a.step) == int(b.step) == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a.params, b.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a.batch_stats, b.batch_stats)


def test_compiling_while_initialising_trains_the_same_blocks(tmp_path, tiny_teacher, caplog):
  # A fresh run compiles (and once runs, on zeros) its step in a second thread while the supernets
  # are initialised; the trained blocks must not depend on it, and a resumed run does not do it.
  caplog.set_level(logging.INFO)
  for overlap in (True, False):
    train(make_config(compile_while_initialising=overlap), tmp_path / str(overlap), tiny_teacher, 2)
    assert ('in a second thread during initialisation' in caplog.text) == overlap
    caplog.clear()
  for block in (1, 2, 3):
    a, _ = restore_block(make_config(), tmp_path / 'True', block, tiny_teacher)
    b, _ = restore_block(make_config(), tmp_path / 'False', block, tiny_teacher)
    assert int(a.step) == int(b.step) == 2
    jax.tree.map(np.testing.assert_array_equal, (a.params, a.batch_stats), (b.params, b.batch_stats))
  train(make_config(epochs=2), tmp_path / 'True', tiny_teacher, 2)  # resumed at step 2
  assert 'resumed at step 2' in caplog.text and 'second thread' not in caplog.text


def test_the_per_layer_step_compiled_ahead_trains_the_same_blocks(tmp_path, tiny_teacher):
  # The stage's default on ImageNet: programs='layer', its programs compiled in other threads
  # (compile_threads), from within the thread that compiles while the supernets are initialised; against
  # each program compiled when first called, in this thread. (Against programs='step' Adam turns the
  # rounding noise of gradients that are zero in exact arithmetic, e.g. a bias before a BatchNorm, into
  # steps of the learning rate's size; tests/test_distill_steps.py compares the two forms' updates.)
  for ahead in (True, False):
    config = make_config(
      programs='layer', parallel='shard_map', compile_threads=2 * ahead, compile_while_initialising=ahead
    )
    train(config, tmp_path / str(ahead), tiny_teacher, 2)
  for block in (1, 2, 3):
    a, _ = restore_block(make_config(), tmp_path / 'True', block, tiny_teacher)
    b, _ = restore_block(make_config(), tmp_path / 'False', block, tiny_teacher)
    assert int(a.step) == int(b.step) == 2
    jax.tree.map(np.testing.assert_array_equal, (a.params, a.batch_stats), (b.params, b.batch_stats))


def test_training_one_block_leaves_the_others_alone(tmp_path, tiny_teacher):
  config = make_config()
  train(config, tmp_path, tiny_teacher, 2)
  before = {b: restore_block(config, tmp_path, b, tiny_teacher)[0] for b in (1, 3)}
  config_b2 = make_config(blocks='2', epochs=2)
  train(config_b2, tmp_path, tiny_teacher, 2)
  assert int(restore_block(config, tmp_path, 2, tiny_teacher)[0].step) == 4
  for b in (1, 3):
    after = restore_block(config, tmp_path, b, tiny_teacher)[0]
    assert int(after.step) == 2
    jax.tree.map(np.testing.assert_array_equal, before[b].params, after.params)


def test_finished_blocks_are_skipped(tmp_path, tiny_teacher):
  config = make_config()
  train(config, tmp_path, tiny_teacher, 2)
  calls = []

  def no_data(start):
    calls.append(start)
    return fixed_batches(start)

  train(config, tmp_path, tiny_teacher, 2, no_data)
  assert calls == []


def test_nan_loss_names_block_cell_step_and_keeps_last_checkpoint(tmp_path, tiny_teacher):
  config = make_config()
  train(config, tmp_path, tiny_teacher, 2)

  def poisoned(start):
    for s, batch in enumerate(fixed_batches(start), start=start + 1):
      if s == 3:
        batch['image'] = np.full_like(batch['image'], np.nan)
      yield batch

  with pytest.raises(FloatingPointError, match=r'block1 cell0 at step 3'):
    train(make_config(epochs=2), tmp_path, tiny_teacher, 2, poisoned)
  state, _ = restore_block(config, tmp_path, 1, tiny_teacher)
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def block2_step(cells, teacher_model, optimizer):
  """The per-device step training block 2's cells alone (uniform paths, seed 0)."""
  return functools.partial(
    distill_steps.distill_step,
    blocks=((1, tuple(cells[1])),),
    teacher_apply=functools.partial(teacher_lib.teacher_features, teacher_model, up_to=2),
    optimizers={'block2': optimizer},
    sampling='uniform',
    seed=0,
  )


def test_pmap_and_shard_map_give_the_same_update(tiny_teacher):
  config = make_config()
  space = space_lib.space_from_config(config.space)
  cells = supernet.supernet_cells(space, stem_stride=1)
  teacher_model, teacher_variables = tiny_teacher
  tx = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, 100), 1e-4)
  states = {'block2': supernet_store.create_block_state(jax.random.PRNGKey(1), tuple(cells[1]), 4, tx)}
  batch = next(fixed_batches(0))
  results = []
  for mode in ('pmap', 'shard_map'):
    step = block2_step(cells, teacher_model, tx)
    # Same path on every device, so that the 8-device update must equal the 1-device one.
    step_fixed = functools.partial(_with_fixed_path, step)
    new_states, _ = parallel.data_parallel(step_fixed, mode, num_broadcast=1)(
      states, parallel.shard_batch(batch, mode), teacher_variables
    )
    results.append(new_states)
  # (A 1-device run differs by design: student BatchNorm uses per-device batch statistics, as DDP does.)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6),
    results[0]['block2'].params,
    results[1]['block2'].params,
  )
  changed = jax.tree.map(
    lambda x, y: float(jnp.max(jnp.abs(x - y))), states['block2'].params, results[0]['block2'].params
  )
  assert max(jax.tree.leaves(changed)) > 0


def test_every_recomputation_choice_gives_the_same_gradients(tiny_teacher):
  """distill.remat only changes what the backward pass stores: 'op' and 'dots' equal plain autodiff."""
  space = space_lib.space_from_config(make_config().space)
  teacher_model, teacher_variables = tiny_teacher
  sgd = optax.sgd(1.0)  # the update is minus the gradient, so no Adam normalisation hides a difference
  batch = parallel.shard_batch(next(fixed_batches(0)), 'shard_map')
  size = space_lib.supernet_input_sizes(space, IMAGE, 1)[1]
  updates = {}
  for remat in supernet.REMAT:
    cells = supernet.supernet_cells(space, stem_stride=1, remat=remat)
    states = {'block2': supernet_store.create_block_state(jax.random.PRNGKey(1), tuple(cells[1]), size, sgd)}
    step = block2_step(cells, teacher_model, sgd)
    new_states, _ = parallel.data_parallel(step, 'shard_map', num_broadcast=1)(states, batch, teacher_variables)
    updates[remat] = jax.tree.map(lambda a, b: np.asarray(a - b), new_states['block2'].params, states['block2'].params)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(updates['none'])) > 1e-3
  for remat in ('op', 'dots'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), updates[remat], updates['none'])
  with pytest.raises(ValueError, match='remat must be one of op, dots, none'):
    supernet.supernet_cells(space, stem_stride=1, remat='all')


def _with_fixed_path(step, states, batch, teacher_variables):
  original = distill_steps.sample_path
  distill_steps.sample_path = lambda rng, s, cell, sampling: jnp.zeros((cell.layers,), jnp.int32)
  try:
    return step(states, batch, teacher_variables)
  finally:
    distill_steps.sample_path = original


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_teacher, caplog):
  config = make_config(epochs=2)
  train(config, tmp_path, tiny_teacher, 2)  # checkpoints at steps 2 and 4
  latest = tmp_path / 'distill' / 'block_3' / '4'
  assert latest.exists()
  for f in latest.rglob('*'):
    if f.is_file() and f.suffix not in ('.json',) and f.stat().st_size > 0 and 'state' in str(f):
      f.write_bytes(b'\0garbage')
  state, meta = restore_block(config, tmp_path, 3, tiny_teacher)
  assert int(state.step) == 2 and meta['step'] == 2
  assert 'unreadable' in caplog.text


def test_learning_rate_steps_before_the_first_epoch_as_the_authors_step_lr():
  authors = distill_steps.create_learning_rate_fn(0.01, 0.9, 10)  # offset 1: epoch 1 already at lr x 0.9
  np.testing.assert_allclose([float(authors(s)) for s in (0, 9, 10, 25)], [0.009, 0.009, 0.0081, 0.00729], rtol=1e-6)
  plain = distill_steps.create_learning_rate_fn(0.01, 0.9, 10, offset=0)
  np.testing.assert_allclose([float(plain(s)) for s in (0, 10)], [0.01, 0.009], rtol=1e-6)


def test_block_one_reads_the_model_normalization():
  """The teacher reads the data's images; the student's block 1 reads them converted (model.normalization)."""
  space = space_lib.space_from_config(make_config().space)
  cells = supernet.supernet_cells(space, stem_stride=1)
  tx = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, 100), 1e-4)
  states = {'block1': supernet_store.create_block_state(jax.random.PRNGKey(1), tuple(cells[0]), IMAGE, tx)}
  # A teacher whose targets do not depend on its input: only the student's input differs below.
  teacher_apply = lambda variables, x: {'block1': jnp.zeros((x.shape[0], IMAGE // 2, IMAGE // 2, 16))}
  unit = np.random.default_rng(0).uniform(0, 1, (8, 2, IMAGE, IMAGE, 3)).astype(np.float32)

  def step(images, normalization):
    fn = functools.partial(
      distill_steps.distill_step,
      blocks=((0, tuple(cells[0])),),
      teacher_apply=teacher_apply,
      optimizers={'block1': tx},
      sampling='uniform',
      seed=0,
      student_normalization=normalization,
    )
    new, _ = parallel.data_parallel(fn, 'pmap', num_broadcast=1)(states, {'image': images}, {})
    return jax.tree.leaves(new['block1'].params)

  converted = step(unit, ('unit', 'imagenet'))
  given = step(np.asarray(images_lib.normalize(unit, 'unit', 'imagenet')), None)
  unconverted = step(unit, None)
  # Adam's first step moves a parameter by about lr = 0.01 whatever its gradient; on near-zero gradients
  # float32 rounding alone can flip that, so compare the bulk of the parameters.
  differs = lambda xs, ys: np.mean(np.concatenate([np.abs(x - y).ravel() for x, y in zip(xs, ys)]) > 1e-3)
  assert differs(converted, given) < 0.01
  assert differs(converted, unconverted) > 0.05  # (only the sampled ops move at all)
