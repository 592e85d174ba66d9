"""Rating: the prefix-sharing vmapped evaluator equals naive per-path evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import space as space_lib
from dna_jax.models import supernet
from dna_jax.stages import rate


def perturbed(variables, seed):
  """Distinct weights per op so that a wrong path shows in the numbers."""
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {'params': jax.tree.unflatten(tree, leaves), 'batch_stats': variables['batch_stats']}


def make_cell(layers, stem):
  cell = space_lib.Cell(layers, 4, 2)
  stem_spec = (4, 4, 1) if stem else None
  return supernet.SupernetCell(cell, 4, 6, stem=stem_spec)


@pytest.mark.parametrize('layers,stem,chunk', [(3, False, 36), (2, True, 6), (3, False, 1000)])
def test_prefix_sharing_equals_naive(layers, stem, chunk):
  cell = make_cell(layers, stem)
  in_ch = 3 if stem else 4
  rng = np.random.default_rng(0)
  calib = jnp.asarray(rng.normal(size=(6, 8, 8, in_ch)), jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(5, 8, 8, in_ch)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(5, 4, 4, 6)), jnp.float32)
  mask = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)
  variables = perturbed(cell.init(jax.random.PRNGKey(1), calib), 2)
  rating_cell = rate.for_rating(cell, None)
  abs_sums, sq_sums = rate.rate_cell(rating_cell, variables, calib, inputs, target, mask, chunk_size=chunk)
  assert abs_sums.shape == (6**layers,)
  paths = list(cell.cell.paths())
  for p in [0, 1, 7, len(paths) // 2, len(paths) - 1]:
    a, s = rate.naive_path_errors(rating_cell, variables, paths[p], calib, inputs, target, mask)
    np.testing.assert_allclose(abs_sums[p], a, rtol=2e-5)
    np.testing.assert_allclose(sq_sums[p], s, rtol=2e-5)
  assert len(set(np.round(abs_sums, 4))) > len(paths) // 2  # paths really differ


def test_recalibration_uses_the_calibration_batch_only():
  cell = make_cell(1, False)
  rng = np.random.default_rng(1)
  calib = jnp.asarray(rng.normal(size=(6, 8, 8, 4)), jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(5, 8, 8, 4)), jnp.float32)
  target = jnp.zeros((5, 4, 4, 6))
  variables = cell.init(jax.random.PRNGKey(1), calib)
  rating_cell = rate.for_rating(cell, None)
  mask = jnp.ones(5)
  base = rate.rate_cell(rating_cell, variables, calib, inputs, target, mask)[0]
  # Stored running statistics are replaced by the recalibrated ones: changing them changes nothing.
  scrambled = {'params': variables['params'], 'batch_stats': jax.tree.map(lambda x: x + 5.0, variables['batch_stats'])}
  np.testing.assert_allclose(rate.rate_cell(rating_cell, scrambled, calib, inputs, target, mask)[0], base, rtol=1e-6)
  # A different calibration batch changes the ratings.
  other = rate.rate_cell(rating_cell, variables, calib * 3 + 1, inputs, target, mask)[0]
  assert np.max(np.abs(other - base)) > 1e-3


def test_layer_evaluation_count_matches_prefix_tree():
  # 6 + 36 + 216 + 1296 = 1554 layer evaluations for a 4-layer cell, vs 4 * 6**4 = 5184 naive.
  assert sum(6**l for l in range(1, 5)) == 1554
  assert rate.trailing_levels(4, 216) == 3
  assert rate.trailing_levels(4, 5) == 1
  assert rate.trailing_levels(2, 10**6) == 2


def test_scores_are_relative_l1_over_all_examples():
  acc = rate.Accumulator(
    {0: np.array([4.0, 8.0])}, {0: np.array([2.0, 6.0])}, target_sum=0.0, target_sq_sum=16.0, count=4.0
  )
  score, mse = acc.scores()
  np.testing.assert_allclose(score[0], [1.0 / 2.0, 2.0 / 2.0], rtol=1e-9)  # mean |S-T| / std(T) = (4/4)/2
  np.testing.assert_allclose(mse[0], [0.5, 1.5])


def test_sharded_rating_equals_single_device():
  cell = make_cell(2, False)
  rng = np.random.default_rng(3)
  calib = jnp.asarray(rng.normal(size=(8, 8, 8, 4)), jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(16, 8, 8, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(16, 4, 4, 6)), jnp.float32)
  mask = jnp.ones(16)
  variables = perturbed(cell.init(jax.random.PRNGKey(1), calib), 4)
  single = rate.rate_cell(rate.for_rating(cell, None), variables, calib, inputs, target, mask)
  from dna_jax import parallel

  shard = lambda x: jax.device_put(x, jax.NamedSharding(parallel.make_mesh(), jax.P(parallel.AXIS)))
  sharded = rate.rate_cell(
    rate.for_rating(cell, None), variables, shard(calib), shard(inputs), shard(target), shard(mask), mode='shard_map'
  )
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(a, b, rtol=1e-4)
