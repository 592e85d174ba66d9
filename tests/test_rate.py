"""Rating: the prefix-sharing vmapped evaluator equals naive per-path evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import cell_rating
from dna_jax import space as space_lib
from dna_jax.models import supernet
from dna_jax.stages import rate


def perturbed(variables, seed):
  """Distinct weights per op so that a wrong path shows in the numbers."""
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {'params': jax.tree.unflatten(tree, leaves), 'batch_stats': variables['batch_stats']}


def rated(cell, variables, calib, inputs, target, mask, chunk_size=216, mode=None, num_groups=1, survivors=None):
  """rate_cell with the cell recalibrated on `calib` (calibrate_cell)."""
  calibration = cell_rating.calibrate_cell(cell, variables, calib, chunk_size, mode)
  return cell_rating.rate_cell(cell, variables, calibration, inputs, target, mask, mode, num_groups, survivors)


def make_cell(layers, stem, pinned=()):
  cell = space_lib.Cell(layers, 4, 2, pinned)
  stem_spec = (4, 4, 1) if stem else None
  return supernet.SupernetCell(cell, 4, 6, stem=stem_spec)


@pytest.mark.parametrize(
  'layers,stem,chunk,pinned',
  [(3, False, 36, ()), (2, True, 6, ()), (3, False, 1000, ()), (3, False, 36, (None, 4, None))],
)
def test_prefix_sharing_equals_naive(layers, stem, chunk, pinned):
  cell = make_cell(layers, stem, pinned)
  in_ch = 3 if stem else 4
  rng = np.random.default_rng(0)
  calib = jnp.asarray(rng.normal(size=(6, 8, 8, in_ch)), jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(5, 8, 8, in_ch)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(5, 4, 4, 6)), jnp.float32)
  mask = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)
  variables = perturbed(cell.init(jax.random.PRNGKey(1), calib), 2)
  rating_cell = cell_rating.for_rating(cell, None)
  abs_sums, sq_sums = rated(rating_cell, variables, calib, inputs, target, mask, chunk_size=chunk)
  assert abs_sums.shape == (cell.cell.num_paths, 1) == (6 ** (layers - len([p for p in pinned if p is not None])), 1)
  abs_sums, sq_sums = abs_sums[:, 0], sq_sums[:, 0]
  paths = list(cell.cell.paths())
  for p in [0, 1, 7, len(paths) // 2, len(paths) - 1]:
    a, s = cell_rating.naive_path_errors(rating_cell, variables, paths[p], calib, inputs, target, mask)
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
  rating_cell = cell_rating.for_rating(cell, None)
  mask = jnp.ones(5)
  base = rated(rating_cell, variables, calib, inputs, target, mask)[0]
  # Stored running statistics are replaced by the recalibrated ones: changing them changes nothing.
  scrambled = {'params': variables['params'], 'batch_stats': jax.tree.map(lambda x: x + 5.0, variables['batch_stats'])}
  np.testing.assert_allclose(rated(rating_cell, scrambled, calib, inputs, target, mask)[0], base, rtol=1e-6)
  # A different calibration batch changes the ratings.
  other = rated(rating_cell, variables, calib * 3 + 1, inputs, target, mask)[0]
  assert np.max(np.abs(other - base)) > 1e-3


@pytest.mark.parametrize('layers,stem,chunk', [(3, False, 36), (2, True, 6)])
def test_one_calibration_serves_every_rating_batch(layers, stem, chunk):
  cell = make_cell(layers, stem)
  in_ch = 3 if stem else 4
  rng = np.random.default_rng(4)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  calib = normal(6, 8, 8, in_ch)
  variables = perturbed(cell.init(jax.random.PRNGKey(1), calib), 5)
  rating_cell = cell_rating.for_rating(cell, None)
  calibration = cell_rating.calibrate_cell(rating_cell, variables, calib, chunk)
  paths = list(cell.cell.paths())
  for _ in range(2):  # each batch scored as if its paths were recalibrated for it alone
    inputs, target, mask = normal(5, 8, 8, in_ch), normal(5, 4, 4, 6), jnp.ones(5)
    abs_sums, sq_sums = cell_rating.rate_cell(rating_cell, variables, calibration, inputs, target, mask)
    for p in [0, 5, len(paths) - 1]:
      a, s = cell_rating.naive_path_errors(rating_cell, variables, paths[p], calib, inputs, target, mask)
      np.testing.assert_allclose([abs_sums[p, 0], sq_sums[p, 0]], [a, s], rtol=2e-5)
  # One statistics entry per node of the tree: walked prefixes, plus each trailing subtree's levels.
  lead = calibration.lead
  assert len(calibration.nodes) == sum(6**l for l in range(1, lead + 1))
  assert len(calibration.subtrees) == 6**lead
  assert (calibration.stem is not None) == stem


def test_layer_evaluation_count_matches_prefix_tree():
  # 6 + 36 + 216 + 1296 = 1554 layer evaluations for a 4-layer cell, vs 4 * 6**4 = 5184 naive.
  assert sum(6**l for l in range(1, 5)) == 1554
  assert cell_rating.trailing_levels(4, 216) == 3
  assert cell_rating.trailing_levels(4, 5) == 1
  assert cell_rating.trailing_levels(2, 10**6) == 2


def test_scores_are_relative_l1_over_all_examples():
  acc = rate.Accumulator.empty([2], 2)
  acc.add_target(0.0, 16.0, np.array([2.0, 2.0]))
  acc.add(0, np.array([[1.0, 3.0], [4.0, 4.0]]), np.array([[1.0, 1.0], [3.0, 3.0]]), None, 4.0, 1.0)
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
  from dna_jax import parallel

  shard = lambda x: jax.device_put(x, jax.NamedSharding(parallel.make_mesh(), jax.P(parallel.AXIS)))
  some = rng.random(36) < 0.4  # rated sparsely: each op on just the prefixes that need it
  for survivors in (None, some):
    single = rated(cell_rating.for_rating(cell, None), variables, calib, inputs, target, mask, survivors=survivors)
    sharded = rated(
      cell_rating.for_rating(cell, None),
      variables,
      shard(calib),
      shard(inputs),
      shard(target),
      shard(mask),
      mode='shard_map',
      survivors=survivors,
    )
    for a, b in zip(single, sharded):
      np.testing.assert_allclose(a, b, rtol=1e-4)
  assert np.all(single[0][some] > 0) and not np.any(single[0][~some])


def tiny_teacher():
  from dna_jax.models import efficientnet

  model = efficientnet.variant('tiny', num_classes=3)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 16, 16, 3))))(jax.random.PRNGKey(7))
  variables['batch_stats'] = jax.tree.map(lambda x: x + 0.3, variables['batch_stats'])
  return model, variables


def test_padding_never_changes_a_statistic():
  from dna_jax import teacher as teacher_lib

  model, variables = tiny_teacher()
  rng = np.random.default_rng(5)
  real = jnp.asarray(rng.uniform(0, 1, (3, 16, 16, 3)), jnp.float32)
  padded = jnp.concatenate([real, jnp.zeros((5, 16, 16, 3))])
  mask = jnp.asarray([1, 1, 1, 0, 0, 0, 0, 0], jnp.float32)
  alone = teacher_lib.teacher_features(model, variables, real, up_to=2, train_mode_bn=True)['block2']
  masked = teacher_lib.teacher_features(model, variables, padded, up_to=2, train_mode_bn=True, mask=mask)['block2']
  np.testing.assert_allclose(masked[:3], alone, rtol=1e-4, atol=1e-5)
  unmasked = teacher_lib.teacher_features(model, variables, padded, up_to=2, train_mode_bn=True)['block2']
  assert not np.allclose(unmasked[:3], alone, atol=1e-3)  # the zeros would have moved the statistics
  # The sums of the rating: padded rows count nowhere, whatever they hold.
  target = jnp.concatenate([alone, jnp.full((5,) + alone.shape[1:], jnp.nan)])
  total, total_sq, per_group = rate.target_moments(target, mask, 2)
  np.testing.assert_allclose(total, alone.sum(), atol=1e-3)  # about 0: normalised features
  np.testing.assert_allclose(total_sq, jnp.square(alone).sum(), rtol=1e-5)
  np.testing.assert_array_equal(per_group, [2 * alone[0].size, alone[0].size])  # examples 0, 2 | 1
  outputs = jnp.concatenate([alone + 1, jnp.full((5,) + alone.shape[1:], jnp.nan)])[None]
  abs_sum, sq_sum = cell_rating.path_errors(outputs, target, mask, 2)
  np.testing.assert_allclose(abs_sum[0], [2 * alone[0].size, alone[0].size], rtol=1e-5)
  np.testing.assert_allclose(sq_sum[0], [2 * alone[0].size, alone[0].size], rtol=1e-5)


def test_teacher_rating_modes():
  model, variables = tiny_teacher()
  rng = np.random.default_rng(6)
  calib = jnp.asarray(rng.uniform(0, 1, (8, 16, 16, 3)), jnp.float32)
  batch = jnp.asarray(rng.uniform(0, 2, (8, 16, 16, 3)), jnp.float32)
  mask = jnp.ones(8)
  out = {}
  for mode in rate.TEACHER_RATING_BN:
    apply, mode_variables = rate.teacher_for_rating(model, variables, calib, 2, mode)
    out[mode] = (apply(mode_variables, calib)['block2'], apply(mode_variables, batch, mask=mask)['block2'])
  # recalibrated: inference mode with the calibration batch's own statistics, so on that batch it equals
  # batch statistics, and on any other batch it differs from both other modes
  np.testing.assert_allclose(out['recalibrated'][0], out['batch'][0], rtol=1e-4, atol=1e-4)
  assert not np.allclose(out['recalibrated'][0], out['running'][0], atol=1e-3)
  for other in ('running', 'batch'):
    assert not np.allclose(out['recalibrated'][1], out[other][1], atol=1e-3)
  with pytest.raises(ValueError, match=r'teacher\.rating_bn'):
    rate.teacher_for_rating(model, variables, calib, 2, 'train')


def test_only_surviving_paths_are_rated_and_groups_split_the_examples():
  cell = make_cell(3, False)
  rng = np.random.default_rng(8)
  calib = jnp.asarray(rng.normal(size=(6, 8, 8, 4)), jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(7, 8, 8, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(7, 4, 4, 6)), jnp.float32)
  mask = jnp.asarray([1, 1, 1, 1, 1, 1, 0], jnp.float32)
  variables = perturbed(cell.init(jax.random.PRNGKey(1), calib), 3)
  rating_cell = cell_rating.for_rating(cell, None)
  full = rated(rating_cell, variables, calib, inputs, target, mask, chunk_size=36, num_groups=4)
  assert full[0].shape == (216, 4)
  np.testing.assert_allclose(
    full[0].sum(-1),
    rated(rating_cell, variables, calib, inputs, target, mask, chunk_size=36)[0][:, 0],
    rtol=1e-5,
  )
  # Sparse (3 paths under prefix (0,); 40% of prefix (2,), each op padded to 2**k or 3 * 2**k prefixes)
  # and whole (all of prefix (5,)) trailing subtrees.
  survivors = np.zeros(216, bool)
  survivors[[0, 7, 35]] = True
  survivors[72:108] = rng.random(36) < 0.4
  survivors[180:216] = True
  assert [cell_rating._padded_size(n, 36) for n in (1, 3, 5, 7, 9, 25, 33)] == [1, 3, 6, 8, 12, 32, 36]
  part = rated(rating_cell, variables, calib, inputs, target, mask, 36, None, 4, survivors)
  for a, b in zip(part, full):
    np.testing.assert_allclose(a[survivors], b[survivors], rtol=1e-5)
    assert not np.any(a[~survivors])


def test_a_path_goes_only_when_enough_cheaper_paths_are_clearly_better():
  from dna_jax import path_pruning

  rng = np.random.default_rng(0)
  base = rng.normal(0, 0.05, 16)  # shared image difficulty: paired differences cancel it
  errors = np.stack([1.0 + base, 1.2 + base, 1.21 + base + rng.normal(0, 0.3, 16), 0.9 + base])
  costs = np.array([[10, 5], [12, 5], [12, 6], [20, 9]])
  counts = path_pruning.dominators(costs, errors, z=3.0)
  # path 1: path 0 is cheaper and clearly better; path 2: cheaper ones are better on average but noisy
  # for path 1 only ... path 0 is clearly better; path 3: the best, dominated by nobody
  assert counts[0] == 0 and counts[1] == 1 and counts[3] == 0
  assert counts[2] <= 1
  keep = path_pruning.prune_block([costs[:2], costs[2:]], [errors[:2], errors[2:]], [8, 8], keep=1, z=3.0)
  np.testing.assert_array_equal(keep[0], [True, False])
  # different output widths never compete
  keep = path_pruning.prune_block([costs[:2], costs[2:]], [errors[:2], errors[2:]], [8, 16], keep=1, z=3.0)
  assert keep[1].all()
  with pytest.raises(ValueError, match='2 groups'):
    path_pruning.dominators(costs, errors[:, :1], z=3.0)


def test_adaptive_rating_gives_the_exhaustive_answer(tmp_path):
  """Same top-k at three FLOPs budgets and a params budget, same Pareto fronts, fewer paths rated."""
  from dna_jax import config_base
  from dna_jax import path_pruning
  from dna_jax import ratings as ratings_lib
  from dna_jax import search as search_lib
  from dna_jax import teacher as teacher_lib
  from dna_jax.models import layers

  config = config_base.get_base_config()
  config.space.blocks = '2 16 1@8; 2 24 1@12,2@12'
  config.space.update(dict(stem_width=8, ds_width=8, head_width=32, stem_stride=1))
  config.teacher.update(dict(variant='tiny', stem_stride=1))
  config.data.update(dict(image_size=16, normalization='unit'))
  config.rate.update(dict(groups=8, adaptive_examples=48, keep=3))
  config.search.top_k = 3
  space = space_lib.space_from_config(config.space)
  model, teacher_variables = tiny_teacher()
  cells = supernet.supernet_cells(space, conventions=layers.conventions_from_config(config.model), stem_stride=1)
  rng = np.random.default_rng(11)
  image = lambda n: rng.uniform(0, 1, (1, n, 16, 16, 3)).astype(np.float32)
  calib = {'image': image(16)}
  batches = [{'image': image(24), 'mask': np.ones((1, 24), np.float32)} for _ in range(4)]
  batches[-1]['mask'][0, 20:] = 0
  features = teacher_lib.teacher_features(model, teacher_variables, jnp.asarray(calib['image'][0]), up_to=2)
  inputs = [jnp.asarray(calib['image'][0]), features['block1']]
  variables = {
    k: [perturbed(cell.init(jax.random.PRNGKey(k), inputs[k]), 10 * k + c) for c, cell in enumerate(cells[k])]
    for k in range(2)
  }
  tables = {}
  for name, path_costs in (
    ('exhaustive', None),
    ('adaptive', {k: path_pruning.block_path_costs(space, k, 16, 1) for k in range(2)}),
  ):
    acc = rate.rate_blocks(config, model, teacher_variables, cells, variables, calib, batches, 4, None, path_costs)
    for k in range(2):
      score, mse = acc[k].scores()
      ratings_lib.write_block_ratings(
        str(tmp_path / name),
        space,
        k,
        score,
        mse,
        resolution=16,
        num_classes=3,
        stem_stride=1,
        images=acc[k].images,
        pruned_for_top_k=3 if path_costs else 0,
      )
    tables[name] = ratings_lib.read_ratings(str(tmp_path / name))
  exhaustive, adaptive = tables['exhaustive'], tables['adaptive']
  pruned = sum(int(b.pruned.sum()) for b in adaptive.blocks)
  assert pruned > 0 and not any(b.pruned.any() for b in exhaustive.blocks)
  assert adaptive.pruned_for_top_k == 3 and exhaustive.pruned_for_top_k == 0
  for a, b in zip(adaptive.blocks, exhaustive.blocks):
    np.testing.assert_array_equal(a.images[~a.pruned], 92)  # 4 batches of 24, 4 padded
    np.testing.assert_array_equal(a.images[a.pruned], 48)
    # the same sums from other XLA programs (one path at a time instead of vmapped): float32 rounding
    np.testing.assert_allclose(a.score[~a.pruned], b.score[~a.pruned], rtol=1e-5)
  low, high = search_lib.pareto_front(exhaustive)[0][[0, -1]]
  params = search_lib.pareto_front(exhaustive, 'params')[0]
  budgets = [(int(low + f * (high - low)), None) for f in (0.2, 0.5, 0.8)] + [(None, int(np.median(params)))]
  for max_flops, max_params in budgets:
    answer = [search_lib.search(t, max_flops, max_params, top_k=3) for t in (exhaustive, adaptive)]
    assert [str(r.architecture) for r in answer[0]] == [str(r.architecture) for r in answer[1]]
  for cost in ('flops', 'params'):
    fronts = [search_lib.pareto_front(t, cost) for t in (exhaustive, adaptive)]
    np.testing.assert_array_equal(fronts[0][0], fronts[1][0])
    np.testing.assert_allclose(fronts[0][1], fronts[1][1], rtol=1e-5)
  with pytest.raises(ValueError, match='top 3'):
    search_lib.search(adaptive, top_k=4)
