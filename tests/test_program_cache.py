"""Stored executables: loaded = compiled, across processes, without tracing; bad files are recompiled."""

import functools
import os
import subprocess
import sys
import textwrap
import threading
from unittest import mock

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
import test_distill_steps

from dna_jax import distill_steps
from dna_jax import files
from dna_jax import link_programs
from dna_jax import parallel
from dna_jax import program_cache
from dna_jax import supernet_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_step(traces: list[int]):
  """A data-parallel step that counts its traces: (state, batch) -> (state, mean)."""

  def step(state, batch):
    traces.append(1)
    mean = lax.pmean(jnp.tanh(batch @ state['w']).mean(), parallel.AXIS)
    return {'w': state['w'] * 0.5 + mean}, mean

  return step


def run(fn, mode, steps=2):
  state = parallel.replicate({'w': np.eye(4, dtype=np.float32)}, mode)
  means = []
  for i in range(steps):
    batch = parallel.shard_batch({'x': np.full((8, 2, 4), i + 1.0, np.float32)}, mode)['x']
    state, mean = fn(state, batch)
    means.append(float(parallel.host_copy(mean)))
  return parallel.host_copy(state)['w'], means


@pytest.mark.parametrize('mode', parallel.MODES)
def test_a_stored_program_loads_without_tracing_and_computes_the_same(tmp_path, mode):
  traces = []
  expected = run(parallel.data_parallel(make_step(traces), mode), mode)
  assert len(traces) == 1
  first = program_cache.ProgramCache(tmp_path).wrap(parallel.data_parallel(make_step(traces), mode), 'step(1)')
  np.testing.assert_array_equal(run(first, mode)[0], expected[0])
  assert len(traces) == 2 and len(list(tmp_path.glob('*.executable'))) == 1
  # A new cache on the same directory (as in a new process) loads it: no trace, same numbers.
  loaded = program_cache.ProgramCache(tmp_path).wrap(parallel.data_parallel(make_step(traces), mode), 'step(1)')
  state, means = run(loaded, mode)
  assert len(traces) == 2
  np.testing.assert_array_equal(state, expected[0])
  assert means == expected[1]
  # Another description is another program; another argument shape another executable.
  other = program_cache.ProgramCache(tmp_path).wrap(parallel.data_parallel(make_step(traces), mode), 'step(2)')
  run(other, mode)
  assert len(traces) == 3 and len(list(tmp_path.glob('*.executable'))) == 2


def test_a_corrupt_file_is_compiled_again_and_replaced(tmp_path):
  traces = []
  expected = run(parallel.data_parallel(make_step(traces), 'pmap'), 'pmap')
  program_cache.ProgramCache(tmp_path).wrap(parallel.data_parallel(make_step(traces), 'pmap'), 'step')(
    *[parallel.replicate({'w': np.eye(4, dtype=np.float32)}, 'pmap'), np.ones((8, 2, 4), np.float32)]
  )
  (stored,) = tmp_path.glob('*.executable')
  stored.write_bytes(stored.read_bytes()[:100])
  traces.clear()
  again = program_cache.ProgramCache(tmp_path).wrap(parallel.data_parallel(make_step(traces), 'pmap'), 'step')
  np.testing.assert_array_equal(run(again, 'pmap')[0], expected[0])
  assert len(traces) == 1
  assert stored.stat().st_size > 1000  # replaced by a whole executable
  assert list(tmp_path.iterdir()) == [stored]  # no temporary file left behind


def test_a_description_with_an_object_address_is_not_stored(tmp_path):
  traces = []
  fn = parallel.data_parallel(make_step(traces), 'pmap')
  what = f'step{(lambda: 0)!r}'
  assert ' at 0x' in what
  assert program_cache.ProgramCache(tmp_path).wrap(fn, what) is fn
  assert program_cache.wrap(None, fn, 'step') is fn


def test_another_process_loads_what_one_stored(tmp_path):
  """The key (source, libraries, flags, devices) is the same in a new process: it loads, not traces."""
  script = textwrap.dedent(f"""
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax, jax.numpy as jnp
    from dna_jax import program_cache
    traced = []
    def f(x):
      traced.append(1)
      return jnp.sin(x) * 3
    fn = program_cache.ProgramCache({str(tmp_path)!r}).wrap(jax.jit(f), 'f')
    print(float(fn(jnp.float32(0.5))), len(traced))
  """)
  outputs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    outputs.append(out.stdout.split())
  assert outputs[0][0] == outputs[1][0] == str(float(np.float32(np.sin(np.float32(0.5)) * 3)))
  assert (outputs[0][1], outputs[1][1]) == ('1', '0')


@pytest.mark.parametrize(
  'programs, mode, compile_threads', [('step', 'pmap', 0), ('layer', 'pmap', 0), ('layer', 'shard_map', 2)]
)
def test_the_distillation_step_loaded_from_the_cache_equals_the_compiled_one(tmp_path, programs, mode, compile_threads):
  """Both forms of the step (one cell): stored when built, loaded (nothing traced) when built again; the
  per-layer one also with its programs compiled ahead of the first step, in other threads."""
  _, blocks, teacher, teacher_variables, sizes = test_distill_steps.make_setup()
  blocks = ((1, blocks[1][1][:1]),)  # block 2's 2-layer cell: the smallest step with every kind of program
  optimizer = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.1, 0.9, 100, 1), 0.0)
  states = {
    f'block{k + 1}': supernet_store.create_block_state(jax.random.PRNGKey(k), cells, sizes[k], optimizer)
    for k, cells in blocks
  }
  build = functools.partial(
    distill_steps.parallel_distill_step,
    blocks,
    teacher,
    False,
    tuple((f'block{k + 1}', 0.1) for k, _ in blocks),
    0.9,
    1,
    100,
    0.0,
    'uniform',
    3,
    mode,
    ('unit', 'imagenet'),
    programs,
    compile_threads=compile_threads,
  )
  compiled = test_distill_steps.run_steps(
    build(cache=program_cache.ProgramCache(tmp_path)), states, mode, teacher_variables, 2
  )
  assert any(tmp_path.glob('*.executable'))
  traced = []

  def counting(original):
    def traced_call(*args, **kwargs):
      traced.append(1)
      return original(*args, **kwargs)

    return traced_call

  for builder in (
    distill_steps.parallel_distill_step,
    link_programs.switch_forward_program,
    link_programs.switch_backward_program,
    distill_steps._loss_program,
  ):
    builder.cache_clear()
  with (
    mock.patch.object(link_programs, '_switch_forward', counting(link_programs._switch_forward)),
    mock.patch.object(distill_steps, 'distill_step', counting(distill_steps.distill_step)),
  ):
    loaded = test_distill_steps.run_steps(
      build(cache=program_cache.ProgramCache(tmp_path)), states, mode, teacher_variables, 2
    )
  assert not traced
  (got, history), (expected, expected_history) = loaded, compiled
  for name in states:
    assert int(got[name].step) == 2
    jax.tree.map(np.testing.assert_array_equal, got[name].params, expected[name].params)
    jax.tree.map(np.testing.assert_array_equal, got[name].batch_stats, expected[name].batch_stats)
  for metrics, expected_metrics in zip(history, expected_history, strict=True):
    assert metrics.keys() == expected_metrics.keys()
    for key in metrics:
      np.testing.assert_array_equal(metrics[key], expected_metrics[key], err_msg=key)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got['block2'].params, states['block2'].params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_persistent_cache_hits_count_for_the_compiling_thread_only():
  # The distill stage compiles its step in one thread while another initialises (and may hit JAX's cache).
  with program_cache._persistent_cache_hits() as hits:
    other = threading.Thread(target=jax.monitoring.record_event, args=(program_cache._CACHE_HIT_EVENT,))
    other.start()
    other.join()
    assert hits == []
    jax.monitoring.record_event(program_cache._CACHE_HIT_EVENT)
  assert len(hits) == 1


def test_caches_of_one_directory_are_equal_so_memoized_builders_reuse_their_programs(tmp_path):
  assert program_cache.ProgramCache(tmp_path) == program_cache.ProgramCache(str(tmp_path))
  assert hash(program_cache.ProgramCache(tmp_path)) == hash(program_cache.ProgramCache(str(tmp_path)))
  assert program_cache.ProgramCache(tmp_path) != program_cache.ProgramCache(tmp_path / 'other')


def test_pruning_deletes_the_least_recently_used_programs_beyond_the_size(tmp_path):
  cache = program_cache.ProgramCache(tmp_path)
  for i in range(3):
    run(cache.wrap(parallel.data_parallel(make_step([]), 'pmap'), f'step({i})'), 'pmap', steps=1)
  stored = sorted(tmp_path.glob('*.executable'), key=lambda p: p.stat().st_mtime_ns)
  assert len(stored) == 3
  for age, path in zip((300, 200, 100), stored):  # oldest first, whole seconds apart
    os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
  # Loading the oldest marks it used: the second oldest goes first.
  oldest_what = 'step(0)'
  traces = []
  run(cache.wrap(parallel.data_parallel(make_step(traces), 'pmap'), oldest_what), 'pmap', steps=1)
  assert not traces and stored[0].exists()
  size = stored[0].stat().st_size
  deleted = cache.prune(2 * size + size // 2)
  assert [str(p) for p in deleted] == [str(stored[1])] and stored[0].exists() and stored[2].exists()
  assert cache.prune(10 * size) == []
  # Storing under a limit below one file keeps only the file just stored.
  small = program_cache.ProgramCache(tmp_path, max_bytes=1)
  run(small.wrap(parallel.data_parallel(make_step([]), 'pmap'), 'step(3)'), 'pmap', steps=1)
  (kept,) = tmp_path.glob('*.executable')
  assert kept not in (stored[0], stored[2])
  assert small != cache and program_cache.ProgramCache(tmp_path, max_bytes=1) == small


def test_calls_try_the_last_program_and_fall_back_to_the_signature_when_it_refuses(tmp_path):
  """A call with the last call's argument types runs its program without working out the signature;
  other shapes, dtypes, structures and placements each get their own program, as before."""
  traced = []

  def f(x):
    traced.append(jax.tree.map(jnp.shape, x))
    return jax.tree.map(lambda v: v * 2 + v.sum(), x)

  fn = program_cache.ProgramCache(tmp_path).wrap(jax.jit(f), 'f')
  cases = [
    np.arange(3, dtype=np.float32),
    np.arange(4, dtype=np.float32),
    np.arange(3, dtype=np.int32),
    (np.arange(3, dtype=np.float32), np.ones(2, np.float32)),
    jax.device_put(np.arange(3, dtype=np.float32), jax.devices()[1]),
  ]
  with mock.patch.object(program_cache, '_abstract', wraps=program_cache._abstract) as abstract:
    for _ in range(2):
      for x in cases:
        got = fn(x)
        expected = jax.tree.map(lambda v: v * 2 + v.sum(), x)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
        assert jax.tree.map(lambda v: v.dtype, got) == jax.tree.map(lambda v: np.asarray(v).dtype, x)
    # One program per case (the two placements share a trace), reused in the second round.
    assert len(traced) == 4 and len(list(tmp_path.glob('*.executable'))) == 5
    calls = abstract.call_count
    for _ in range(3):
      fn(cases[-1])
    assert abstract.call_count == calls  # the same types as the last call: no signature worked out


def test_a_program_from_jax_s_persistent_cache_is_not_stored_again(tmp_path):
  """Stored after JAX's persistent cache handed it back, an executable failed when run in a new process
  ("Function add_rsqrt_fusion not found" on XLA:CPU): such a program is not stored, and every run computes."""
  script = textwrap.dedent(f"""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from dna_jax import program_cache
    program_cache.enable_compilation_cache({str(tmp_path / 'jax')!r})
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    def f(x, w):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jax.nn.relu(y * jax.lax.rsqrt(jnp.mean(y**2) + 1e-3)).sum()
    fn = jax.jit(f)
    if sys.argv[1] == 'stored':
      fn = program_cache.ProgramCache({str(tmp_path / 'programs')!r}).wrap(fn, 'f')
    x, w = np.ones((2, 16, 16, 8), np.float32), np.full((3, 3, 8, 8), 0.1, np.float32)
    print(float(fn(x, w)))
  """)
  outputs = []
  for use in ('jit', 'stored', 'stored'):  # JAX's cache filled; hit through the program cache; again
    out = subprocess.run([sys.executable, '-c', script, use], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    outputs.append(out.stdout.split()[-1])
  assert outputs[0] == outputs[1] == outputs[2]
  assert not list((tmp_path / 'programs').glob('*.executable'))


def test_a_stored_program_is_not_written_to_jax_s_persistent_cache_as_well(tmp_path):
  """Each compiled executable is serialised and written once: by the program cache, not by JAX's as well."""
  script = textwrap.dedent(f"""
    import jax, numpy as np
    from dna_jax import program_cache
    program_cache.enable_compilation_cache({str(tmp_path / 'jax')!r})
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    x = np.ones((4, 4), np.float32)
    stored = program_cache.ProgramCache({str(tmp_path / 'programs')!r}).wrap(jax.jit(lambda x: x @ x + 1.0), 'f')
    print(float(np.asarray(stored(x)).sum()))
    print(sorted(p.name.split('-')[0] for p in program_cache.epath.Path({str(tmp_path / 'jax')!r}).iterdir()))
    print(float(np.asarray(jax.jit(lambda x: x @ x - 1.0)(x)).sum()))  # not stored by the program cache: JAX's cache writes it
    print(sorted(p.name.split('-')[0] for p in program_cache.epath.Path({str(tmp_path / 'jax')!r}).iterdir()))
  """)
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.split('\n')
  assert float(lines[0]) == 16 * 5.0 and float(lines[2]) == 16 * 3.0
  assert len(list((tmp_path / 'programs').glob('*.executable'))) == 1
  assert lines[1] == '[]' and lines[3] == "['jit__lambda']"


def test_threads_storing_the_same_file_at_once_each_succeed(tmp_path):
  """Two compile threads may store the same program at once: each writes its own temporary file."""
  path, errors = tmp_path / 'program.executable', []

  def store(data: bytes) -> None:
    try:
      for _ in range(200):
        files.atomic_write_bytes(path, data)
    except OSError as e:
      errors.append(e)

  threads = [threading.Thread(target=store, args=(b'x' * 100_000,)) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  assert path.read_bytes() == b'x' * 100_000
  assert [p.name for p in tmp_path.iterdir()] == ['program.executable']  # no temporary file left
