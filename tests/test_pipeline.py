"""Orchestration: stage parsing, start-up errors, workdir identity, stage markers."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dna_jax import config_base
from dna_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_stages_are_ordered_and_validated():
  assert config_base.parse_stages('search, distill') == ['distill', 'search']
  with pytest.raises(ValueError, match='config.stages is empty'):
    config_base.parse_stages(' , ')
  with pytest.raises(ValueError, match='unknown stage.*distil.*valid: teacher, distill'):
    config_base.parse_stages('distil')


@pytest.mark.parametrize('name', ['demo', 'imagenet_b7', 'dna_a', 'dna_b', 'dna_c', 'dna_d', 'efficientnet_b0'])
def test_config_files_load_and_validate(name):
  config = load_config(name)
  assert pipeline.validate(config)
  assert pipeline.validate(load_config(name, 'local'))
  with pytest.raises(ValueError, match='unknown config argument'):
    load_config(name, 'bogus')


def test_workdir_from_a_different_experiment_is_refused(tmp_path):
  config = load_config('demo')
  pipeline.check_workdir(config, str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['identity']['data.dataset'] == 'fashion_mnist'
  pipeline.check_workdir(config, str(tmp_path))  # same experiment: fine
  config.retrain.epochs = 7  # not part of the identity: fine
  pipeline.check_workdir(config, str(tmp_path))
  config.space.blocks = '2 16 1@8'
  with pytest.raises(ValueError, match=r'different experiment \(space: workdir has'):
    pipeline.check_workdir(config, str(tmp_path))


def test_finished_stages_are_skipped(tmp_path, monkeypatch):
  config = load_config('demo')
  config.stages = 'search,distill'
  calls = []
  monkeypatch.setattr(pipeline, '_stage_runner', lambda name: lambda c, w: calls.append(name) or {'ok': 1})
  monkeypatch.setattr(pipeline, 'print_summary', lambda workdir: None)
  pipeline.run(config, str(tmp_path))
  assert calls == ['distill', 'search']
  assert json.loads((tmp_path / 'stages' / 'distill.done').read_text())['ok'] == 1
  pipeline.run(config, str(tmp_path))
  assert calls == ['distill', 'search']


def run_main(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(
    [sys.executable, '-m', 'dna_jax.main', *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
  )


def test_bad_config_fails_at_start_up_with_a_clear_message(tmp_path):
  demo = os.path.join('configs', 'demo.py')
  out = run_main('--config', demo, '--workdir', str(tmp_path), '--config.distill.lerning_rate=1')
  assert out.returncode != 0 and 'lerning_rate' in out.stderr
  out = run_main('--config', demo, '--workdir', str(tmp_path), '--config.distill.epochs=many')
  assert out.returncode != 0 and 'epochs' in out.stderr
  out = run_main('--config', demo, '--workdir', str(tmp_path), '--config.stages=')
  assert out.returncode != 0 and 'config.stages is empty' in out.stderr
  assert not (tmp_path / 'stages').exists()


def test_library_info_records_are_hidden_but_warnings_and_our_own_kept():
  import logging as std_logging

  from dna_jax import main as main_lib

  quiet = main_lib.QuietLibraries()

  def record(path, level):
    return std_logging.LogRecord('absl', level, path, 1, 'message', None, None)

  site = '/venv/lib/python3.11/site-packages'
  assert not quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', std_logging.INFO))
  assert not quiet.filter(record(f'{site}/tensorflow_datasets/core/reader.py', std_logging.INFO))
  assert quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', std_logging.WARNING))
  assert quiet.filter(record('/src/dna_jax/distill.py', std_logging.INFO))
