"""Orchestration: stage parsing, start-up errors, workdir identity, stage markers."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from dna_jax import cli
from dna_jax import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_stages_are_ordered_and_validated():
  assert stages.parse_stages('search, distill') == ['distill', 'search']
  with pytest.raises(ValueError, match=r'config\.stages is empty'):
    stages.parse_stages(' , ')
  with pytest.raises(ValueError, match=r'unknown stage.*distil.*valid: teacher, distill'):
    stages.parse_stages('distil')


@pytest.mark.parametrize(
  'name',
  [
    'demo',
    'demo_deep_teacher',
    'demo_fidelity',
    'demo_study',
    'demo_versus_random',
    'imagenet_b7',
    'dna_a',
    'dna_b',
    'dna_c',
    'dna_d',
    'efficientnet_b0',
  ],
)
def test_config_files_load_and_validate(name):
  config = load_config(name)
  assert stages.validate(config)
  assert stages.validate(load_config(name, 'local'))
  if not name.startswith('demo'):
    assert stages.validate(load_config(name, 'authors'))
  with pytest.raises(ValueError, match='unknown config argument'):
    load_config(name, 'bogus')


def test_authors_variants_change_what_their_docstrings_list():
  search, authors = load_config('imagenet_b7'), load_config('imagenet_b7', 'authors')
  assert (search.model.dtype, authors.model.dtype) == ('bfloat16', 'float32')
  assert (search.teacher.train_mode_bn, authors.teacher.train_mode_bn) == (False, True)
  assert (search.teacher.rating_bn, authors.teacher.rating_bn) == ('running', 'recalibrated')
  assert (search.data.calib_augment, authors.data.calib_augment) == (False, True)
  assert (search.rate.adaptive, authors.rate.adaptive) == (True, False)
  for config in (search, authors):  # the authors' distillation augmentation and input, in both
    assert (config.data.random_erasing, config.data.random_erasing_mode) == (0.5, 'normal')
    assert config.data.train_resize_method == 'random' and config.model.normalization == 'imagenet'
    assert config.distill.lr_decay_offset == 1 and config.space.blocks == 'imagenet'
  for name in ('dna_a', 'dna_b', 'dna_c', 'dna_d'):
    paper, script = load_config(name), load_config(name, 'authors')
    assert (paper.retrain.epochs, script.retrain.epochs) == (350, 500)
    assert (paper.retrain.weight_decay, script.retrain.weight_decay) == (1e-5, 1e-4)
    assert (paper.model.bn_sync, script.model.bn_sync) == ('global', 'device')
    assert script.retrain.batch_size // 8 == 128 and script.data.color_jitter == 0.06
    assert (script.model.padding, script.model.bn_epsilon) == ('symmetric', 1e-5)


def test_workdir_from_a_different_experiment_is_refused(tmp_path):
  config = load_config('demo')
  stages.check_workdir(config, str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['identity']['data.dataset'] == 'fashion_mnist'
  stages.check_workdir(config, str(tmp_path))  # same experiment: fine
  config.retrain.epochs = 7  # not part of the identity: fine
  stages.check_workdir(config, str(tmp_path))
  config.space.blocks = '2 16 1@8'
  with pytest.raises(ValueError, match=r'different experiment \(space: workdir has'):
    stages.check_workdir(config, str(tmp_path))


def test_finished_stages_are_skipped(tmp_path, monkeypatch):
  config = load_config('demo')
  config.stages = 'search,distill'
  calls = []
  monkeypatch.setattr(stages, 'stage_runner', lambda name: lambda c, w: calls.append(name) or {'ok': 1})
  stages.run(config, str(tmp_path))
  assert calls == ['distill', 'search']
  assert json.loads((tmp_path / 'stages' / 'distill.done').read_text())['ok'] == 1
  stages.run(config, str(tmp_path))
  assert calls == ['distill', 'search']


def run_main(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(
    [sys.executable, '-m', 'dna_jax.main', *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
  )


def one_line_error(out) -> str:
  """The single `error: ...` line a user error must print (exit code 2, no traceback)."""
  lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(('W', 'I0', 'I1'))]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-2000:]
  return lines[0]


def test_bad_config_fails_at_start_up_with_a_clear_message(tmp_path):
  demo = os.path.join('configs', 'demo.py')
  line = one_line_error(run_main('--config', demo, '--workdir', str(tmp_path), '--config.distill.lerning_rate=1'))
  assert "unknown config key 'distill.lerning_rate'" in line and 'distill.learning_rates' in line
  line = one_line_error(run_main('--config', demo, '--workdir', str(tmp_path), '--config.no_such_key=1'))
  assert "unknown config key 'no_such_key'" in line
  line = one_line_error(run_main('--config', 'configs/no_such.py', '--workdir', str(tmp_path)))
  assert 'configs/no_such.py: no such config file' in line
  assert 'epochs' in one_line_error(
    run_main('--config', demo, '--workdir', str(tmp_path), '--config.distill.epochs=many')
  )
  assert 'config.stages is empty' in one_line_error(
    run_main('--config', demo, '--workdir', str(tmp_path), '--config.stages=')
  )
  assert 'workdir' in one_line_error(run_main('--config', demo))
  assert not (tmp_path / 'stages').exists()


def test_every_command_shares_the_error_convention(tmp_path):
  """Each `python -m dna_jax.X` prints one `error:` line and exits 2 on a user error (cli.py)."""
  from dna_jax import describe
  from dna_jax.stages import search as search_stage

  assert cli.call(describe.main, describe.FLAGS, ['no_such_net']) == 2
  assert cli.call(describe.main, describe.FLAGS, ['--no_such_flag', 'dna_a']) == 2
  assert cli.call(search_stage.main, search_stage.FLAGS, ['--ratings', str(tmp_path)]) == 2
  assert cli.call(describe.main, describe.FLAGS, ['dna_a']) == 0


def test_library_info_records_are_hidden_but_warnings_and_our_own_kept():
  import logging as std_logging

  quiet = cli.QuietLibraries()

  def record(path, level):
    return std_logging.LogRecord('absl', level, path, 1, 'message', None, None)

  site = '/venv/lib/python3.11/site-packages'
  assert not quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', std_logging.INFO))
  assert not quiet.filter(record(f'{site}/tensorflow_datasets/core/reader.py', std_logging.INFO))
  assert quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', std_logging.WARNING))
  assert quiet.filter(record('/src/dna_jax/distill.py', std_logging.INFO))


def test_compilation_cache_is_on_by_default_and_persists_programs(tmp_path, monkeypatch):
  from dna_jax import program_cache

  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert load_config('demo').compilation_cache_dir == 'auto'
  assert program_cache.compilation_cache_dir('auto') == str(tmp_path / 'xdg' / 'dna_jax' / 'jax')
  assert program_cache.compilation_cache_dir('') is None
  assert program_cache.compilation_cache_dir('gs://bucket/cache') == 'gs://bucket/cache'
  assert load_config('demo').program_cache_dir == 'auto'
  assert program_cache.program_cache_dir('auto') == str(tmp_path / 'xdg' / 'dna_jax' / 'programs')
  assert program_cache.program_cache_dir('') is None
  assert program_cache.from_config(ml_collections.ConfigDict({'program_cache_dir': ''})) is None
  cache = tmp_path / 'cache'
  program = (
    'import jax; from dna_jax import program_cache; '
    f'program_cache.enable_compilation_cache({str(cache)!r}); '
    "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0); "
    'print(float(jax.jit(lambda x: x * 2 + 1)(1.0)))'
  )
  for _ in range(2):  # the second process finds the program in the cache
    out = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == '3.0', out.stderr[-2000:]
  assert any(cache.iterdir())
