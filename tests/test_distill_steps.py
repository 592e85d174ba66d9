"""The distillation step as one program per layer shape equals the one-program step, and reuses its programs."""

import functools
import logging
import os
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import numpy as np
import optax
import pytest

from dna_jax import config_base
from dna_jax import distill_steps
from dna_jax import host_memory
from dna_jax import link_programs
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.models import supernet
from dna_jax.stages import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 16
# Block 1 (stem, DS and two cells) and block 2, whose 2- and 3-layer cells repeat layer shapes.
SPACE = '2 16 1@8,2@8; 2 24 2@12,3@12'


def make_setup():
  """The space, its (block, cells), the teacher, its variables and the cells' input sizes."""
  space = space_lib.parse_space(SPACE, 8, 8)
  cells = supernet.supernet_cells(space, stem_stride=1)
  teacher = efficientnet.variant('tiny', num_classes=10)
  teacher_variables = jax.jit(lambda r: teacher.init(r, jax.numpy.zeros((1, IMAGE, IMAGE, 3))))(jax.random.PRNGKey(7))
  sizes = space_lib.supernet_input_sizes(space, IMAGE, 1)
  blocks = tuple((k, tuple(cells[k])) for k in range(len(cells)))
  return space, blocks, teacher, teacher_variables, sizes


@pytest.fixture(scope='module')
def setup():
  return make_setup()


def batches(steps):
  for step in range(steps):
    images = np.random.default_rng(step).uniform(0, 1, (8, 2, IMAGE, IMAGE, 3)).astype(np.float32)
    yield {'image': images, 'label': np.zeros((8, 2), np.int32)}


def run_steps(step_fn, states, mode, teacher_variables, steps):
  states = parallel.replicate(states, mode)
  history = []
  for batch in batches(steps):
    states, metrics = step_fn(states, parallel.shard_batch(batch, mode), teacher_variables)
    history.append(jax.device_get(metrics))
  return parallel.host_copy(states), history


def step_arguments(blocks, teacher, optimizer):
  return dict(
    blocks=blocks,
    teacher_apply=functools.partial(teacher_lib.teacher_features, teacher, up_to=max(k for k, _ in blocks) + 1),
    optimizers={f'block{k + 1}': optimizer for k, _ in blocks},
    sampling='uniform',
    seed=3,
    student_normalization=('unit', 'imagenet'),
  )


@pytest.mark.parametrize('mode', parallel.MODES)
def test_one_program_per_layer_shape_gives_the_same_update(setup, mode):
  """Two steps on 8 devices (each its own paths): parameters, statistics and metrics as the one program's."""
  _, blocks, teacher, teacher_variables, sizes = setup
  sgd = optax.sgd(1.0)  # the update is minus the gradient: no Adam normalisation hides a difference
  states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.PRNGKey(k), cells, sizes[k], sgd)
    for k, cells in blocks
  }
  arguments = step_arguments(blocks, teacher, sgd)
  one_program = parallel.data_parallel(
    functools.partial(distill_steps.distill_step, **arguments), mode, num_broadcast=1
  )
  layerwise = distill_steps.LayerwiseStep(mode=mode, **arguments)
  expected, expected_history = run_steps(one_program, states, mode, teacher_variables, 2)
  got, history = run_steps(layerwise, states, mode, teacher_variables, 2)
  for name in states:
    assert int(got[name].step) == int(expected[name].step) == 2
    for part in ('params', 'batch_stats'):
      jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
        getattr(got[name], part),
        getattr(expected[name], part),
      )
  for metrics, expected_metrics in zip(history, expected_history):
    assert metrics.keys() == expected_metrics.keys()
    for key in metrics:
      np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-4, err_msg=key)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got['block2'].params, states['block2'].params)
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_adam_on_each_link_gives_the_block_update(setup):
  """Each link's optimizer step on its own (with its part of the Adam state) equals the block's step."""
  _, blocks, teacher, teacher_variables, sizes = setup
  blocks = blocks[1:]  # block 2: cells of 2 and 3 layers
  # The blocks' optimizer (weight decay on kernels, Adam, a schedule) with a large epsilon: Adam would turn
  # the rounding noise of gradients that are zero in exact arithmetic (a bias before a BatchNorm) into
  # steps of the learning rate's size, which differ between any two programs.
  adam = optax.chain(
    optax.add_decayed_weights(0.1, mask=supernet_store.kernel_mask),
    optax.scale_by_adam(eps=1e-3),
    optax.scale_by_learning_rate(distill_steps.create_learning_rate_fn(0.01, 0.9, 1)),
  )
  states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.PRNGKey(k), cells, sizes[k], adam)
    for k, cells in blocks
  }
  arguments = step_arguments(blocks, teacher, adam)
  one_program = parallel.data_parallel(
    functools.partial(distill_steps.distill_step, **arguments), 'shard_map', num_broadcast=1
  )
  expected, expected_history = run_steps(one_program, states, 'shard_map', teacher_variables, 3)
  got, history = run_steps(
    distill_steps.LayerwiseStep(mode='shard_map', **arguments), states, 'shard_map', teacher_variables, 3
  )
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, expected)
  for metrics, expected_metrics in zip(history, expected_history):
    np.testing.assert_allclose(metrics['block2/grad_norm'], expected_metrics['block2/grad_norm'], rtol=1e-5)
  mu = got['block2'].opt_state[1].mu
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(mu)) > 0  # Adam's statistics moved
  assert int(got['block2'].opt_state[1].count) == 3


class CompileLog(logging.Handler):
  """The names of the programs XLA compiles while it is attached to JAX's logger."""

  def __init__(self):
    super().__init__()
    self.compiled: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    if record.getMessage().startswith('Finished XLA compilation of '):
      self.compiled.append(record.getMessage().split()[4])


def test_compiling_ahead_compiles_every_program_once_before_the_first_step_and_changes_nothing(setup):
  """compile_threads: the same programs compiled, all before the first step runs, and the same two steps."""
  _, blocks, teacher, teacher_variables, sizes = setup
  adam = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, 1), 0.1)
  states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.PRNGKey(k), cells, sizes[k], adam)
    for k, cells in blocks
  }
  log, jax_logger = CompileLog(), logging.getLogger('jax')
  results, compiled, after_ahead = {}, {}, []
  jax_logger.addHandler(log)
  jax.config.update('jax_log_compiles', True)  # for every thread (a `with` would set it for this one)
  try:
    for ahead in (False, True):
      jax.clear_caches()
      for builder in [*vars(distill_steps).values(), *vars(link_programs).values()]:
        if hasattr(builder, 'cache_clear'):
          builder.cache_clear()
      step = distill_steps.LayerwiseStep(
        mode='shard_map', compile_threads=2 * ahead, **step_arguments(blocks, teacher, adam)
      )
      if ahead:
        step._compile_ahead = lambda *args, run=step._compile_ahead: (
          run(*args),
          after_ahead.append(len(log.compiled)),
        )
      start = len(log.compiled)
      results[ahead] = run_steps(step, states, 'shard_map', teacher_variables, 2)
      compiled[ahead] = sorted(log.compiled[start:])
  finally:
    jax.config.update('jax_log_compiles', False)
    jax_logger.removeHandler(log)
  assert compiled[True] == compiled[False]
  assert len([name for name in compiled[True] if 'switch_backward' in name]) == 8  # links of distinct shapes
  assert after_ahead == [len(log.compiled)]  # nothing compiled once the steps ran
  (expected, expected_history), (got, history) = results[False], results[True]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
  assert all(np.array_equal(h[k], g[k]) for h, g in zip(history, expected_history) for k in h)


def test_a_links_part_of_the_optimizer_state_goes_back_in_its_place():
  params = {'cell0': {'layer0': {'w': np.ones(2)}, 'layer1': {'w': np.ones(3)}}, 'cell1': {'layer0': {'w': np.ones(4)}}}
  adam = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, 1), 0.1)
  state = jax.tree.map(np.asarray, adam.init(params))
  state = jax.tree.map(lambda x: x + np.arange(x.size).reshape(x.shape), state)  # every leaf distinct
  parts = {
    (cell, link): supernet_store.link_opt_state(state, params, cell, link) for cell in params for link in params[cell]
  }
  assert jax.tree.structure(parts['cell1', 'layer0']) == jax.tree.structure(adam.init(params['cell1']['layer0']))
  np.testing.assert_array_equal(parts['cell0', 'layer1'][1].nu['w'], state[1].nu['cell0']['layer1']['w'])
  rebuilt = supernet_store.block_opt_state(state, params, parts)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, state)


def test_links_of_the_same_shape_share_one_program(setup):
  """Forward programs are traced once per distinct (modules, input shape), on the first step only."""
  _, blocks, teacher, teacher_variables, sizes = setup
  sgd = optax.sgd(0.1)
  states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.PRNGKey(k), cells, sizes[k], sgd)
    for k, cells in blocks
  }
  traced = []
  original = link_programs._switch_forward

  def counting(modules, params, stats, x, op):
    traced.append((modules, x.shape))
    return original(modules, params, stats, x, op)

  link_programs.switch_forward_program.cache_clear()
  with mock.patch.object(link_programs, '_switch_forward', counting):
    layerwise = distill_steps.LayerwiseStep(mode='pmap', **step_arguments(blocks, teacher, sgd))
    run_steps(layerwise, states, 'pmap', teacher_variables, 1)
    first_step = len(traced)
    run_steps(layerwise, states, 'pmap', teacher_variables, 2)
  link_programs.switch_forward_program.cache_clear()
  links = sum(len(cell.units()) for _, cells in blocks for cell in cells)
  assert links == 12  # block 1: 2 x (stem, DS) + 1 + 2 layers; block 2: 2 + 3 layers
  # Distinct: the stem and DS (both cells'); block 1: 8 -> 16 stride 2 (cell 0), 8 -> 8 stride 2 and
  # 8 -> 16 (cell 1); block 2: 16 -> 12 stride 2 (both cells), 12 -> 24 (both), 12 -> 12 (cell 1).
  assert first_step == len(set(traced)) == 8
  assert len(traced) == first_step  # the next two steps traced nothing


def test_an_unknown_programs_value_is_refused_before_any_work(tmp_path):
  config = config_base.get_base_config()
  config.distill.programs = 'cell'
  with pytest.raises(ValueError, match=r"distill\.programs must be one of step, layer, got 'cell'"):
    distill.run(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  'key, value, least',
  [('concurrent_cells', 0, 1), ('concurrent_cells', -1, 1), ('compile_threads', -1, 0), ('compile_threads', -4, 0)],
)
def test_a_bad_thread_count_is_refused_before_any_work(tmp_path, key, value, least):
  config = config_base.get_base_config()
  config.distill[key] = value
  with pytest.raises(ValueError, match=rf'distill\.{key} must be a whole number of at least {least}'):
    distill.run(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_cells_launched_from_two_threads_give_the_same_steps_bit_for_bit(tmp_path):
  """On one device, concurrent_cells=2 runs cells from two threads after the first step; same numbers."""
  script = textwrap.dedent("""
    import os, sys, threading
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
    import jax
    jax.config.update('jax_disable_most_optimizations', True)
    import numpy as np, optax
    sys.path.insert(0, 'tests')
    import test_distill_steps as t
    from dna_jax import distill_steps, parallel, supernet_store
    _, blocks, teacher, teacher_variables, sizes = t.make_setup()
    blocks = blocks[:1]  # its two cells can run at once
    sgd = optax.sgd(1.0)
    threads = []
    original = distill_steps.LayerwiseStep.train_cell
    def recording(self, *args):
      threads.append(threading.current_thread() is threading.main_thread())
      return original(self, *args)
    distill_steps.LayerwiseStep.train_cell = recording
    results = []
    for concurrent_cells in (1, 2):
      step = distill_steps.LayerwiseStep(mode='shard_map', concurrent_cells=concurrent_cells,
                                         **t.step_arguments(blocks, teacher, sgd))
      assert (step.cell_threads is None) == (concurrent_cells == 1)
      states = parallel.replicate({f'block{k + 1}': supernet_store.create_block_state(
          jax.random.PRNGKey(k), cells, sizes[k], sgd) for k, cells in blocks}, 'shard_map')
      history = []
      for i in range(3):
        images = np.random.default_rng(i).uniform(0, 1, (1, 16, t.IMAGE, t.IMAGE, 3)).astype(np.float32)
        states, metrics = step(states, parallel.shard_batch({'image': images}, 'shard_map'), teacher_variables)
        history.append(jax.device_get(metrics))
      results.append((jax.tree.leaves(parallel.host_copy(states)), history))
    (first, first_history), (second, second_history) = results
    assert len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(np.array_equal(h[k], g[k]) for h, g in zip(first_history, second_history) for k in h)
    cells = sum(len(c) for _, c in blocks)
    # Sequential: all 3 steps on the main thread; threaded: the first step there, the next two not.
    assert threads == [True] * 3 * cells + [True] * cells + [False] * 2 * cells, threads
    print('same')
  """)
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-1] == 'same'


def test_sampled_ops_run_as_their_own_programs_give_the_same_steps(tmp_path):
  """On one device, sampled_op_programs: each sampled op's forward keeps its residuals for its backward
  (no recomputation, no switch); the same states and metrics as the per-layer-shape switch, under
  shard_map and pmap, and compiling ahead compiles every op's programs before the first step."""
  script = textwrap.dedent("""
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
    import functools
    import jax
    jax.config.update('jax_disable_most_optimizations', True)
    import numpy as np, optax
    sys.path.insert(0, 'tests')
    import test_distill_steps as t
    from dna_jax import distill_steps, link_programs, parallel, supernet_store
    _, blocks, teacher, teacher_variables, sizes = t.make_setup()
    # The blocks' optimizer with a large epsilon (see test_adam_on_each_link_gives_the_block_update).
    adam = optax.chain(
        optax.add_decayed_weights(0.1, mask=supernet_store.kernel_mask),
        optax.scale_by_adam(eps=1e-3),
        optax.scale_by_learning_rate(distill_steps.create_learning_rate_fn(0.01, 0.9, 1)))
    called = []
    for module, name in ((link_programs, '_switch_backward'), (link_programs, '_backward')):
      original = getattr(module, name)
      @functools.wraps(original)
      def recording(*args, original=original, name=name):
        called.append(name)
        return original(*args)
      setattr(module, name, recording)
    log = t.CompileLog()
    t.logging.getLogger('jax').addHandler(log)
    jax.config.update('jax_log_compiles', True)
    after_ahead = []
    # The switch under shard_map, then sampled-op programs under both modes (the switch gives the same
    # steps under pmap: test_one_program_per_layer_shape_gives_the_same_update).
    results = {}
    for mode, by_op in (('shard_map', False), ('shard_map', True), ('pmap', True)):
      called.clear()
      step = distill_steps.LayerwiseStep(mode=mode, sampled_op_programs=by_op,
                                         compile_threads=2 * (mode == 'shard_map'),
                                         **t.step_arguments(blocks, teacher, adam))
      assert step.by_op == by_op
      if by_op and mode == 'shard_map':
        start = len(log.compiled)
        step._compile_ahead = lambda *args, run=step._compile_ahead: (run(*args), after_ahead.append(len(log.compiled)))
      states = parallel.replicate({f'block{k + 1}': supernet_store.create_block_state(
          jax.random.PRNGKey(k), cells, sizes[k], adam) for k, cells in blocks}, mode)
      history = []
      for i in range(3):
        images = np.random.default_rng(i).uniform(0, 1, (1, 16, t.IMAGE, t.IMAGE, 3)).astype(np.float32)
        states, metrics = step(states, parallel.shard_batch({'image': images}, mode), teacher_variables)
        history.append(jax.device_get(metrics))
      results[mode, by_op] = (parallel.host_copy(states), history)
      if by_op and mode == 'shard_map':
        compiled = log.compiled[start:]
        assert after_ahead == [len(log.compiled)]  # nothing compiled once the steps ran
      assert set(called) == {'_backward' if by_op else '_switch_backward'}, set(called)
    expected, expected_history = results['shard_map', False]
    for mode in ('shard_map', 'pmap'):
      got, history = results[mode, True]
      assert jax.tree.structure(got) == jax.tree.structure(expected)
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, expected)
      for metrics, expected_metrics in zip(history, expected_history):
        assert metrics.keys() == expected_metrics.keys()
        for key in metrics:
          np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-4, err_msg=key)
    # Compiled ahead: a forward and a backward for every op of every link shape, whichever ops were sampled.
    from dna_jax.models import supernet
    shapes = {(modules, shape) for k, cells in blocks for cell in cells for (_, modules, _), shape in
              zip(cell.units(), cell.link_input_shapes(supernet.input_shape(cell, 16, sizes[k])))}
    ops = sum(len(modules) for modules, _ in shapes)
    assert sum(name == 'jit(_forward)' for name in compiled) == ops, (ops, compiled)
    assert sum(name == 'jit(_backward)' for name in compiled) == ops, (ops, compiled)
    print('same', ops)
  """)
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-2] == 'same'


def test_sampled_op_programs_give_way_when_memory_mappings_run_short(setup, tmp_path, caplog):
  """Their programs need ~120 memory mappings each on XLA:CPU: with too few left, one program per layer shape."""
  _, blocks, _, _, _ = setup
  limit, maps = tmp_path / 'max_map_count', tmp_path / 'maps'
  limit.write_text('65530\n')
  maps.write_text('mapping\n' * 530)
  assert host_memory.memory_map_room(str(maps), str(limit)) == 65_000
  assert host_memory.memory_map_room(str(maps), str(tmp_path / 'absent')) is None
  # SPACE: 6 layer shapes of 6 ops, the stem and the DS (the other test compiles these 38): 2 x 38 programs.
  needed = 76 * link_programs.MAPS_PER_PROGRAM + link_programs.MAPS_KEPT_FOR_OTHER_PROGRAMS
  cells = tuple(cell for _, block_cells in blocks for cell in block_cells)
  for room, fits in ((needed, True), (needed - 1, False), (None, True)):
    link_programs.usable.cache_clear()
    with mock.patch.object(host_memory, 'memory_map_room', return_value=room):
      assert link_programs.usable(cells) is False  # 8 devices: each samples its own path
      link_programs.usable.cache_clear()
      with mock.patch.object(jax, 'device_count', return_value=1):
        assert link_programs.usable(cells) == fits
  link_programs.usable.cache_clear()
  assert 'Raise vm.max_map_count' in caplog.text
