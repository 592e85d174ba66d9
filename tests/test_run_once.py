"""run_once.jit: initialisers compiled with less optimisation give the same variables as jax.jit."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dna_jax import run_once
from dna_jax import space as space_lib
from dna_jax.models import layers
from dna_jax.models import supernet


def assert_trees_close(a, b):
  """Equal but for float rounding: LLVM's optimisation level can round a value's last bit differently."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)


@pytest.fixture(autouse=True)
def optimisations_on():
  """conftest turns most of XLA's optimisations off, and run_once.jit is then plain jax.jit."""
  before = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def test_initialisers_give_the_variables_of_jax_jit():
  ops = supernet.candidate_ops(24, 2, layers.Conventions())
  assert len(ops) == len(space_lib.OPS)
  keys = tuple(jax.random.split(jax.random.PRNGKey(3), len(ops)))
  x = jnp.zeros((1, 16, 16, 16), jnp.float32)

  def init(keys):
    return tuple(op.init(key, x) for op, key in zip(ops, keys))

  variables = run_once.jit(init)(keys)
  assert_trees_close(variables, jax.jit(init)(keys))
  params = variables[-1]['params']
  tx = optax.adamw(1e-3)
  assert_trees_close(run_once.jit(tx.init)(params), jax.jit(tx.init)(params))


def test_on_the_cpu_it_compiles_with_the_options_and_inside_other_programs_it_is_plain_jax_jit():
  with mock.patch.object(run_once.jax, 'jit', wraps=jax.jit) as jit:
    f = run_once.jit(lambda x, y: x * 2.0 + y)
  assert [call.kwargs for call in jit.call_args_list] == [{}, {'compiler_options': run_once.OPTIONS}]
  np.testing.assert_array_equal(f(np.ones(3, np.float32), 1.0), [3.0, 3.0, 3.0])
  np.testing.assert_array_equal(f(np.zeros(3, np.float32), 2.0), [2.0, 2.0, 2.0])
  np.testing.assert_array_equal(f(np.ones((2, 2), np.float32), 0.0), np.full((2, 2), 2.0))
  assert f.cache_size() == 2  # one program per signature
  # JAX refuses compiler options on a nested jit: inside another program (or an abstract evaluation) the
  # plain jit is inlined, and nothing is compiled for it.
  np.testing.assert_array_equal(jax.jit(lambda x: f(x, 1.0) - 1.0)(np.ones(4, np.float32)), [2.0] * 4)
  assert jax.eval_shape(f, jax.ShapeDtypeStruct((5,), jnp.float32), 1.0).shape == (5,)
  assert f.cache_size() == 2


def test_with_most_optimisations_off_it_is_plain_jax_jit():
  jax.config.update('jax_disable_most_optimizations', True)
  with mock.patch.object(run_once.jax, 'jit', wraps=jax.jit) as jit:
    f = run_once.jit(lambda x: x + 1.0)
  assert [call.kwargs for call in jit.call_args_list] == [{}]
  np.testing.assert_array_equal(f(np.zeros(2, np.float32)), [1.0, 1.0])
  np.testing.assert_array_equal(f(np.ones(2, np.float32)), [2.0, 2.0])
  assert f.cache_size() == 1
