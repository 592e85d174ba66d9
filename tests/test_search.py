"""Ratings files and the exact search, checked against brute force on small random spaces."""

import json
import os

import numpy as np
import pytest

from dna_jax import cli
from dna_jax import costs
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib
from dna_jax.stages import search as search_stage

RESOLUTION, NUM_CLASSES = 32, 10


def random_cell(rng: np.random.Generator, stride: int) -> space_lib.Cell:
  """1-2 layers; a layer pinned to one op now and then (the search must honour pins)."""
  layers = int(rng.integers(1, 3))
  pinned = tuple(int(rng.integers(6)) if rng.random() < 0.2 else None for _ in range(layers))
  return space_lib.Cell(layers, int(rng.choice([8, 12, 16])), stride, pinned)


def random_space(rng: np.random.Generator, max_archs: int = 150_000) -> space_lib.SearchSpace:
  """2-4 blocks of 1-3 cells (1-2 layers) with different widths, so the width dependency matters."""
  while True:
    blocks = []
    for _ in range(rng.integers(2, 5)):
      stride = int(rng.integers(1, 3))
      cells = {random_cell(rng, stride) for _ in range(rng.integers(1, 4))}
      blocks.append(space_lib.Block(tuple(sorted(cells, key=lambda c: (c.layers, c.width, c.name))), 16))
    space = space_lib.SearchSpace(tuple(blocks), stem_width=8, ds_width=8, head_width=32)
    if space.num_architectures <= max_archs:
      return space


def write_random_ratings(
  directory: str, space: space_lib.SearchSpace, rng: np.random.Generator, ties: bool
) -> ratings_lib.Ratings:
  for k, block in enumerate(space.blocks):
    draw = (lambda n: rng.integers(0, 4, n) / 8) if ties else (lambda n: rng.random(n))
    scores = {c: draw(cell.num_paths) for c, cell in enumerate(block.cells)}
    mses = {c: rng.random(cell.num_paths) for c, cell in enumerate(block.cells)}
    ratings_lib.write_block_ratings(directory, space, k, scores, mses, resolution=RESOLUTION, num_classes=NUM_CLASSES)
  return ratings_lib.read_ratings(directory)


def brute_force(ratings: ratings_lib.Ratings):
  """Every architecture as arrays (score, flops, params, rows per block), in ranking order."""
  score, flops, params = np.zeros(1), np.array([ratings.fixed_flops]), np.array([ratings.fixed_params])
  width, rows, keys = np.array([ratings.space.ds_width]), np.zeros((1, 0), int), np.zeros((1, 0), int)
  for block, table in zip(ratings.space.blocks, ratings.blocks):
    parts = []
    for w_in in np.unique(width):
      arch = np.flatnonzero(width == w_in)
      cand = np.flatnonzero(table.in_channels == w_in)
      a, c = np.repeat(arch, len(cand)), np.tile(cand, len(arch))
      parts.append((a, c))
    a = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    score, flops, params = score[a] + table.score[c], flops[a] + table.flops[c], params[a] + table.params[c]
    width = np.array([cell.width for cell in block.cells])[table.cell[c]]
    rows = np.column_stack([rows[a], c])
    keys = np.column_stack([keys[a], table.cell[c], table.path[c]])
  order = np.lexsort(tuple(keys.T[::-1]) + (params, flops, score))
  return score[order], flops[order], params[order], rows[order]


@pytest.mark.parametrize('seed', range(16))
def test_search_matches_brute_force(tmp_path, seed):
  rng = np.random.default_rng(seed)
  space = random_space(rng)
  ratings = write_random_ratings(str(tmp_path), space, rng, ties=seed % 2 == 0)
  score, flops, params, rows = brute_force(ratings)
  assert len(score) == space.num_architectures
  for trial in range(4):
    max_flops = int(np.quantile(flops, rng.uniform(0.02, 0.9))) if trial in (0, 1) else None
    max_params = int(np.quantile(params, rng.uniform(0.02, 0.9))) if trial in (0, 2) else None
    top_k = int(rng.choice([1, 3, 7]))
    feasible = np.ones(len(score), bool)
    if max_flops is not None:
      feasible &= flops <= max_flops
    if max_params is not None:
      feasible &= params <= max_params
    if not feasible.any():
      with pytest.raises(ValueError, match='no architecture'):
        search_lib.search(ratings, max_flops, max_params, top_k)
      continue
    results = search_lib.search(ratings, max_flops, max_params, top_k)
    expected = np.flatnonzero(feasible)[:top_k]
    assert [r.rows for r in results] == [tuple(rows[i]) for i in expected]
    assert [r.flops for r in results] == flops[expected].tolist()
    assert [r.params for r in results] == params[expected].tolist()
    np.testing.assert_allclose([r.score for r in results], score[expected], rtol=0, atol=1e-12)


def test_results_cost_as_costs_module(tmp_path):
  rng = np.random.default_rng(1)
  ratings = write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  for r in search_lib.search(ratings, top_k=5):
    total, _ = costs.architecture_cost(r.architecture, RESOLUTION, NUM_CLASSES)
    assert (r.flops, r.params, r.macs) == (total.flops, total.params, total.macs)
    assert ratings_lib.architecture_rating(ratings, r.architecture) == {
      'score': pytest.approx(r.score, abs=1e-12),
      'flops': r.flops,
      'params': r.params,
      'macs': r.macs,
    }


def test_all_ties_break_by_flops_params_then_choices(tmp_path):
  space = space_lib.SearchSpace(
    (
      space_lib.Block((space_lib.Cell(1, 8, 2), space_lib.Cell(1, 12, 2)), 16),
      space_lib.Block((space_lib.Cell(1, 8, 1),), 16),
    ),
    8,
    8,
    32,
  )
  for k, block in enumerate(space.blocks):
    zeros = {c: np.zeros(cell.num_paths) for c, cell in enumerate(block.cells)}
    ratings_lib.write_block_ratings(
      str(tmp_path), space, k, zeros, zeros, resolution=RESOLUTION, num_classes=NUM_CLASSES
    )
  ratings = ratings_lib.read_ratings(str(tmp_path))
  results = search_lib.search(ratings, top_k=space.num_architectures)
  order = [(r.flops, r.params, r.choices) for r in results]
  assert order == sorted(order) and len(set(order)) == space.num_architectures == 72


@pytest.mark.parametrize('seed', range(6))
def test_pareto_front_matches_brute_force(tmp_path, seed):
  rng = np.random.default_rng(100 + seed)
  ratings = write_random_ratings(str(tmp_path), random_space(rng), rng, ties=seed % 2 == 0)
  score, flops, params, _ = brute_force(ratings)
  for name, values in (('flops', flops), ('params', params)):
    order = np.lexsort((score, values))
    best = np.minimum.accumulate(score[order])
    keep = np.r_[True, best[1:] < best[:-1] - 1e-12]
    got_cost, got_score = search_lib.pareto_front(ratings, name)
    assert got_cost.tolist() == values[order][keep].tolist()
    np.testing.assert_allclose(got_score, best[keep], rtol=0, atol=1e-12)


def test_budget_below_cheapest_names_minimum(tmp_path):
  rng = np.random.default_rng(2)
  ratings = write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  _, flops, params, _ = brute_force(ratings)
  with pytest.raises(ValueError, match=f'minimum achievable FLOPs is {flops.min():,} '):
    search_lib.search(ratings, max_flops=int(flops.min()) - 1)
  with pytest.raises(ValueError, match=f'minimum achievable params is {params.min():,} '):
    search_lib.search(ratings, max_params=int(params.min()) - 1)
  assert search_lib.search(ratings, max_flops=int(flops.min()))[0].flops == flops.min()


def test_round_trip_and_completion(tmp_path):
  rng = np.random.default_rng(3)
  space = random_space(rng)
  directory = str(tmp_path / 'ratings')
  scores = [{c: rng.random(cell.num_paths) for c, cell in enumerate(b.cells)} for b in space.blocks]
  for k in range(len(space.blocks)):
    assert not ratings_lib.block_complete(directory, k)
    ratings_lib.write_block_ratings(
      directory, space, k, scores[k], scores[k], resolution=RESOLUTION, num_classes=NUM_CLASSES
    )
    assert ratings_lib.block_complete(directory, k)
  ratings = ratings_lib.read_ratings(directory)
  assert ratings.space == space and (ratings.resolution, ratings.num_classes) == (RESOLUTION, NUM_CLASSES)
  fixed = costs.fixed_cost(8, 8, 32, RESOLUTION, space_lib.final_size(space, RESOLUTION), NUM_CLASSES)
  assert (ratings.fixed_flops, ratings.fixed_params, ratings.fixed_macs) == (fixed.flops, fixed.params, fixed.macs)
  sizes = space_lib.block_sizes(space, RESOLUTION)
  for k, (block, table) in enumerate(zip(space.blocks, ratings.blocks)):
    widths = space_lib.block_input_widths(space, k)
    assert len(table) == block.num_paths * len(widths)
    for i in range(len(table)):
      cell = block.cells[table.cell[i]]
      assert table.ops[i] == list(cell.paths())[table.path[i]]
      assert table.score[i] == scores[k][table.cell[i]][table.path[i]]
      head = space.head_width if k == len(space.blocks) - 1 else None
      cost = costs.cell_cost(cell, table.ops[i], int(table.in_channels[i]), sizes[k], head)
      assert (table.flops[i], table.params[i], table.macs[i]) == (cost.flops, cost.params, cost.macs)
  with pytest.raises(ValueError, match='different resolution'):
    ratings_lib.write_meta(directory, space, RESOLUTION * 2, NUM_CLASSES)


def test_incomplete_ratings_say_which_blocks(tmp_path):
  rng = np.random.default_rng(4)
  space = random_space(rng)
  block = space.blocks[0]
  values = {c: rng.random(cell.num_paths) for c, cell in enumerate(block.cells)}
  ratings_lib.write_block_ratings(
    str(tmp_path), space, 0, values, values, resolution=RESOLUTION, num_classes=NUM_CLASSES
  )
  with pytest.raises(ValueError, match=r'meta.json: ratings incomplete, blocks \[2'):
    ratings_lib.read_ratings(str(tmp_path))


@pytest.mark.parametrize(
  'line, edit, message',
  [
    (4, lambda f: f[:4] + ['oops'] + f[5:], "block_1.csv, line 4: could not convert string to float: 'oops'"),
    (3, lambda f: f[:2] + ['k9e6'] + f[3:], "block_1.csv, line 3: unknown op 'k9e6'"),
    (5, lambda f: f[:8], 'block_1.csv, line 5: expected 10 fields'),
    (2, lambda f: f[:3] + ['999'] + f[4:], 'block_1.csv, line 2: in_channels 999 is not a possible input width'),
    (6, lambda f: f[:1] + ['7@7'] + f[2:], "block_1.csv, line 6: cell '7@7' is not in block 1"),
  ],
)
def test_malformed_csv_names_file_and_line(tmp_path, line, edit, message):
  rng = np.random.default_rng(5)
  write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  path = tmp_path / 'block_1.csv'
  lines = path.read_text().splitlines()
  lines[line - 1] = ','.join(edit(lines[line - 1].split(',')))
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError) as error:
    ratings_lib.read_ratings(str(tmp_path))
  assert str(path) in str(error.value) and message in str(error.value)


def test_duplicate_and_missing_rows(tmp_path):
  rng = np.random.default_rng(6)
  write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  path = tmp_path / 'block_1.csv'
  lines = path.read_text().splitlines()
  path.write_text('\n'.join(lines[:-1] + [lines[1]]) + '\n')
  with pytest.raises(ValueError, match=rf'line {len(lines)}: duplicate of line 2'):
    ratings_lib.read_ratings(str(tmp_path))
  path.write_text('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(ValueError, match=r'block_1.csv: \d+ rows, expected \d+ .* missing e.g.'):
    ratings_lib.read_ratings(str(tmp_path))


def test_run_search_files_cli_and_overwrite(tmp_path, capsys):
  rng = np.random.default_rng(7)
  ratings_dir = str(tmp_path / 'work' / 'ratings')
  ratings = write_random_ratings(ratings_dir, random_space(rng), rng, ties=False)
  _, flops, _, _ = brute_force(ratings)
  budget = int(np.median(flops))
  results = search_stage.run_search(ratings_dir, None, budget, None, top_k=2)
  out = tmp_path / 'work' / 'search'
  assert sorted(os.listdir(out)) == ['arch_1.json', 'arch_2.json', 'pareto.png']
  saved = json.loads((out / 'arch_1.json').read_text())
  assert space_lib.Architecture.from_dict(saved) == results[0].architecture
  assert (saved['flops'], saved['max_flops'], saved['rank']) == (results[0].flops, budget, 1)
  assert space_lib.load_architecture(str(out / 'arch_2.json')) == results[1].architecture
  # existing files: refused without --overwrite, no traceback
  assert (
    cli.call(
      search_stage.main, search_stage.FLAGS, ['--ratings', ratings_dir, '--max_flops', str(budget), '--top_k', '2']
    )
    == 2
  )
  assert 'arch_1.json, arch_2.json, pareto.png; choose another output directory or pass --overwrite' in (
    capsys.readouterr().err
  )
  assert (
    cli.call(
      search_stage.main,
      search_stage.FLAGS,
      ['--ratings', ratings_dir, '--max_flops', str(budget), '--top_k', '2', '--json', '--overwrite', '--no_plot'],
    )
    == 0
  )
  printed = json.loads(capsys.readouterr().out)
  assert [p['string'] for p in printed] == [str(r.architecture) for r in results]
  assert (
    cli.call(
      search_stage.main,
      search_stage.FLAGS,
      ['--ratings', ratings_dir, '--max_flops', '1', '--out', str(tmp_path / 'x')],
    )
    == 2
  )
  assert 'minimum achievable FLOPs is' in capsys.readouterr().err


def test_fewer_feasible_than_top_k(tmp_path):
  rng = np.random.default_rng(8)
  ratings = write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  _, flops, params, rows = brute_force(ratings)
  for max_flops, max_params in (
    (int(flops.min()), None),
    (None, int(params.min())),
    (int(np.sort(flops)[2]), int(np.sort(params)[-3])),
  ):
    feasible = np.flatnonzero((flops <= (max_flops or flops.max())) & (params <= (max_params or params.max())))
    assert 1 <= len(feasible) < 20
    results = search_lib.search(ratings, max_flops, max_params, top_k=20)
    assert [r.rows for r in results] == [tuple(rows[i]) for i in feasible]


def test_stage_run_reads_config_budgets(tmp_path):
  import ml_collections

  rng = np.random.default_rng(9)
  ratings = write_random_ratings(str(tmp_path / 'ratings'), random_space(rng), rng, ties=False)
  _, _, params, _ = brute_force(ratings)
  config = ml_collections.ConfigDict(
    {
      'search': {
        'max_flops': 0,
        'max_params': int(np.median(params)),
        'top_k': 2,
        'objective': 'sum',
        'max_latency_ms': 0.0,
        'latency_table': '',
      }
    }
  )
  for _ in range(2):  # a rerun replaces its own files
    summary = search_stage.run(config, str(tmp_path))
  expected = search_lib.search(ratings, None, int(np.median(params)), 2)
  assert summary['architecture'] == str(expected[0].architecture) and summary['nets'] == 2
  assert json.loads((tmp_path / 'search' / 'arch_2.json').read_text())['string'] == str(expected[1].architecture)


def test_the_authors_objectives_match_brute_force(tmp_path):
  """'norm_sum' (per-block z-scores, their norm_mse) and 'product' rank every net as computed by hand."""
  rng = np.random.default_rng(11)
  ratings = write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  _, flops, _, rows = brute_force(ratings)
  budget = int(np.median(flops))
  feasible = flops <= budget
  per_block_norm = []
  for table in ratings.blocks:
    values = table.score[table.in_channels == table.in_channels.min()]
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    per_block_norm.append(((table.score - values.mean()) / std + 2) / 4 if std else np.full(len(table.score), 0.5))
  norm = sum(per_block_norm[k][rows[:, k]] for k in range(len(ratings.blocks)))
  product = np.prod([ratings.blocks[k].score[rows[:, k]] for k in range(len(ratings.blocks))], axis=0)
  for objective, value in (('norm_sum', norm), ('product', product)):
    best = search_lib.search(ratings_lib.with_objective(ratings, objective), budget, None, top_k=3)
    expected = np.flatnonzero(feasible)[np.argsort(value[feasible], kind='stable')[:3]]
    np.testing.assert_allclose([value[np.flatnonzero((rows == r.rows).all(1))[0]] for r in best], value[expected])
  assert search_lib.search(ratings_lib.with_objective(ratings, 'sum'), budget)[0].rows == tuple(rows[feasible][0])
  with pytest.raises(ValueError, match='valid: sum, norm_sum, product'):
    ratings_lib.with_objective(ratings, 'mean')


def test_files_without_the_images_column_still_read(tmp_path):
  """Ratings written before adaptive rating (9 columns) read as every path rated on every image."""
  rng = np.random.default_rng(12)
  write_random_ratings(str(tmp_path), random_space(rng), rng, ties=False)
  new = ratings_lib.read_ratings(str(tmp_path))
  for path in tmp_path.glob('block_*.csv'):
    lines = path.read_text().splitlines()
    path.write_text('\n'.join(line.rsplit(',', 1)[0] for line in lines) + '\n')
  old = ratings_lib.read_ratings(str(tmp_path))
  assert all(b.images is None and not b.pruned.any() for b in old.blocks)
  np.testing.assert_array_equal(old.blocks[0].score, new.blocks[0].score)
