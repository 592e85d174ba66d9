"""Test setup: 8 simulated CPU devices stand in for a TPU host; fast compiles."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax

jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_platforms', 'cpu')

import gc

import pytest

from dna_jax import cell_rating
from dna_jax import distill_steps
from dna_jax import link_programs
from dna_jax.models import supernet

# Builders that keep compiled programs alive for reuse within a run.
_PROGRAM_CACHES = (
  link_programs.switch_forward_program,
  link_programs.switch_backward_program,
  distill_steps._loss_program,
  link_programs.sampled_op_forward_program,
  link_programs.sampled_op_backward_program,
  link_programs.update_program,
  distill_steps.parallel_distill_step,
  cell_rating.compiled,
  supernet._init_program,
  supernet.candidate_op_forward,
  supernet.candidate_op_gradient,
)


@pytest.fixture(autouse=True, scope='session')
def _caches_in_a_temporary_directory(tmp_path_factory):
  """Stages store compiled programs under $XDG_CACHE_HOME ('auto'): this session's, not the user's."""
  before = os.environ.get('XDG_CACHE_HOME')
  os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('xdg_cache'))
  yield
  if before is None:
    os.environ.pop('XDG_CACHE_HOME')
  else:
    os.environ['XDG_CACHE_HOME'] = before


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  Each XLA:CPU executable holds memory mappings (one test of the per-layer step: about 8,000), and
  the whole suite in one process passed the kernel's limit of 65,530 and crashed in a compile.
  """
  yield
  for cache in _PROGRAM_CACHES:
    cache.cache_clear()
  jax.clear_caches()
  gc.collect()
