"""Search versus random: the statistics against hand-computed cases and scipy, the equal-cost sampler,
and a killed study that resumes without retraining."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats

from dna_jax import config_base
from dna_jax import random_nets
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import studies
from dna_jax.stages import search as search_stage
from dna_jax.stages import versus_random

# 42 x 6 x 12 = 3,024 architectures; block 2 reads two input widths.
SPACE = space_lib.parse_space('2 16 1@8,2@8; 2 24 1@12; 1 32 1@16,1@24', 8, 8, 32)


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
  """A workdir with random ratings of SPACE and the search's top 5 under a FLOPs budget."""
  workdir = tmp_path_factory.mktemp('searched')
  rng = np.random.default_rng(0)
  for k, block in enumerate(SPACE.blocks):
    scores = {c: rng.random(cell.num_paths) for c, cell in enumerate(block.cells)}
    ratings_lib.write_block_ratings(
      str(workdir / 'ratings'), SPACE, k, scores, scores, resolution=32, num_classes=10, stem_stride=1
    )
  ratings = ratings_lib.read_ratings(str(workdir / 'ratings'))
  flops = random_nets.totals(ratings, random_nets.sample_architectures(ratings, 2000, rng), 'flops')
  search_stage.run_search(str(workdir / 'ratings'), str(workdir / 'search'), int(np.median(flops)), top_k=5, plot=False)
  return str(workdir), ratings


def test_percentile_and_beat_probability_by_hand_and_scipy():
  sample = [1.0, 2.0, 2.0, 3.0, 5.0]
  for value in (0.5, 2.0, 4.0, 6.0):
    assert rank_stats.percentile_of(value, sample) == pytest.approx(stats.percentileofscore(sample, value, 'mean'))
  # 2 seeds of the chosen net against 2 nets x 2 seeds: 8 pairs, the chosen wins 4, ties 1
  chosen, others = np.array([0.8, 0.6]), np.array([[0.7, 0.6], [0.9, 0.5]])
  assert rank_stats.beat_probability(chosen, others) == pytest.approx((4 + 0.5) / 8)


def test_partial_tau_by_hand_from_scipy_taus():
  rng = np.random.default_rng(1)
  z = rng.normal(size=12)
  x, y = z + rng.normal(size=12), z + rng.normal(size=12)
  t_xy, t_xz, t_yz = (stats.kendalltau(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
  expected = (t_xy - t_xz * t_yz) / np.sqrt((1 - t_xz**2) * (1 - t_yz**2))
  assert rank_stats.partial_kendall_tau(x, y, z) == pytest.approx(expected, abs=1e-12)
  # y a monotone function of z: nothing is left to correlate once z is held fixed (undefined, NaN)
  assert np.isnan(rank_stats.partial_kendall_tau(x, z**3, z))
  interval = rank_stats.with_interval_of(rank_stats.partial_kendall_tau, (x, y, z), 500, seed=3)
  assert interval == rank_stats.with_interval_of(rank_stats.partial_kendall_tau, (x, y, z), 500, seed=3)
  assert interval['low'] <= interval['value'] <= interval['high']


def test_versus_random_report():
  random = np.array([[0.70, 0.72], [0.74, 0.73], [0.69, 0.71], [0.80, 0.78]])
  report = rank_stats.versus_random([0.76, 0.75], random, np.array([[0.76, 0.75], [0.70, 0.70]]), 400, seed=0)
  assert report['rank'] == 2 and report['num_random'] == 4  # only the 0.79 net is better
  assert report['percentile']['value'] == pytest.approx(75.0)
  assert report['beat_probability']['value'] == pytest.approx(12 / 16)
  assert report['top_minus_random']['value'] == pytest.approx(np.mean([0.755, 0.70]) - random.mean())
  for key in ('percentile', 'beat_probability', 'top_minus_random'):
    assert report[key]['low'] <= report[key]['value'] <= report[key]['high']
  best = rank_stats.versus_random([0.9, 0.9], random, resamples=200, seed=0)
  assert best['rank'] == 1 and best['percentile'] == {'value': 100.0, 'low': 100.0, 'high': 100.0}


def test_equal_cost_sampler_stays_in_the_band_and_is_reproducible(searched):
  _, ratings = searched
  flops = random_nets.totals(ratings, random_nets.sample_architectures(ratings, 500, np.random.default_rng(2)), 'flops')
  target = int(np.median(flops))
  exclude = [random_nets.sample_architectures(ratings, 1, np.random.default_rng(4))[0]]
  rows = random_nets.equal_cost(ratings, target, 0.05, 12, np.random.default_rng(5), exclude, draws=4000)
  got = random_nets.totals(ratings, rows, 'flops')
  assert len(rows) == 12 and np.all(np.abs(got - target) <= 0.05 * target)
  assert len({tuple(r) for r in rows}) == 12 and tuple(exclude[0]) not in {tuple(r) for r in rows}
  again = random_nets.equal_cost(ratings, target, 0.05, 12, np.random.default_rng(5), exclude, draws=4000)
  np.testing.assert_array_equal(rows, again)
  with pytest.raises(ValueError, match='widen the tolerance'):
    random_nets.equal_cost(ratings, target, 1e-9, 12, np.random.default_rng(5), draws=100)


def test_same_cell_sampler_keeps_the_cells_and_the_band(searched):
  _, ratings = searched
  cells = (1, 0, 1)  # 2@8, 1@12, 1@24: 36 x 6 x 6 nets
  rows = random_nets.sample_architectures(ratings, 400, np.random.default_rng(6), cells)
  for k, cell in enumerate(cells):
    np.testing.assert_array_equal(ratings.blocks[k].cell[rows[:, k]], cell)
  assert len({tuple(r) for r in rows}) > 150  # uniform over the 1,296 nets of those cells, not a few
  flops = random_nets.totals(ratings, rows, 'flops')
  target = int(np.median(flops))
  picked = random_nets.equal_cost(ratings, target, 0.05, 6, np.random.default_rng(7), draws=2000, cells=cells)
  assert np.all(np.abs(random_nets.totals(ratings, picked, 'flops') - target) <= 0.05 * target)
  for k, cell in enumerate(cells):
    np.testing.assert_array_equal(ratings.blocks[k].cell[picked[:, k]], cell)
  again = random_nets.equal_cost(ratings, target, 0.05, 6, np.random.default_rng(7), draws=2000, cells=cells)
  np.testing.assert_array_equal(picked, again)
  with pytest.raises(ValueError, match=r'architectures of cells \(1, 0, 1\)'):
    random_nets.equal_cost(ratings, target, 1e-9, 6, np.random.default_rng(7), draws=100, cells=cells)


def study_workdir(source: str, directory):
  """A workdir that links the rating and search outputs of `source`, as a study reads them."""
  directory.mkdir()
  for name in ('ratings', 'search'):
    os.symlink(os.path.join(source, name), directory / name)
  return directory


class Killed(Exception):
  """Stands for the process being killed mid-study."""


def study_config():
  config = config_base.get_base_config()
  config.seed = 3
  config.versus_random.update(dict(num_random=5, seeds=2, tolerance=0.1, top_k=2, bootstrap=200, draws=2000))
  return config


def test_study_resumes_after_kill_without_retraining(searched, tmp_path, monkeypatch):
  source, ratings = searched
  workdir = study_workdir(source, tmp_path / 'work')
  calls = []

  def fake_train(config, arch, directory, seed, epochs, kill_at=None):
    """Accuracy falls with the summed score; each seed adds noise of its own."""
    calls.append((str(arch), seed))
    if len(calls) == kill_at:
      raise Killed
    score = ratings_lib.architecture_rating(ratings, arch)['score']
    return {'accuracy': 0.9 - 0.1 * score + 0.001 * seed, 'raw_accuracy': 0.5 + 0.1 * score}

  monkeypatch.setattr(studies, 'train_architecture', lambda *a: fake_train(*a, kill_at=4))
  with pytest.raises(Killed):
    versus_random.run(study_config(), str(workdir))
  done = calls[:3]
  calls.clear()
  monkeypatch.setattr(studies, 'train_architecture', fake_train)
  summary = versus_random.run(study_config(), str(workdir))
  assert len(calls) == 2 * 7 - 3 and not set(done) & set(calls)  # finished runs never trained again
  calls.clear()
  assert versus_random.run(study_config(), str(workdir)) == summary and not calls

  picked = json.loads((workdir / 'versus_random' / 'picked.json').read_text())['nets']
  chosen = json.loads((workdir / 'search' / 'arch_1.json').read_text())
  assert picked[0]['arch'] == chosen['string'] and [n['role'] for n in picked] == ['searched'] * 2 + ['random'] * 5
  assert all(abs(n['flops'] - chosen['flops']) <= 0.1 * chosen['flops'] for n in picked[2:])
  with open(workdir / 'versus_random' / 'runs.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['arch', 'role', 'flops', 'params', 'score', 'seed', 'accuracy'] and len(rows) == 14
  report = json.loads((workdir / 'versus_random' / 'summary.json').read_text())
  # the fake's accuracy is a falling function of the score: the ratings rank perfectly
  assert report['kendall_tau']['value'] == 1.0 and report['rank'] == 1 + sum(
    n['score'] < picked[0]['score'] for n in picked[2:]
  )
  for key in ('percentile', 'beat_probability', 'top_minus_random', 'partial_kendall_tau'):
    assert set(report[key]) == {'value', 'low', 'high'}
  assert (workdir / 'versus_random' / 'versus_random.png').stat().st_size > 0
  # Scored by the final weights instead: the same runs, read again, none trained; here ranked backwards.
  raw = study_config()
  raw.versus_random.weights = 'raw'
  versus_random.run(raw, str(workdir))
  report = json.loads((workdir / 'versus_random' / 'summary.json').read_text())
  assert not calls and report['weights'] == 'raw' and report['kendall_tau']['value'] == -1.0
  raw.versus_random.weights = 'best'
  with pytest.raises(ValueError, match=r"versus_random.weights must be one of \['ema', 'raw'\], got 'best'"):
    versus_random.run(raw, str(workdir))
  with pytest.raises(ValueError, match='a larger num_random extends the study'):
    config = study_config()
    config.versus_random.num_random = 4
    versus_random.run(config, str(workdir))
  # A run made with another recipe, or with none recorded, is refused, never mixed into the study.
  other = study_config()
  other.retrain.base_learning_rate *= 2
  with pytest.raises(ValueError, match=r'another recipe \(retrain.base_learning_rate differ\); delete .*0_seed3'):
    versus_random.run(other, str(workdir))
  result = workdir / 'versus_random' / 'runs' / '0_seed3' / 'result.json'
  result.write_text(json.dumps({k: v for k, v in json.loads(result.read_text()).items() if k != 'recipe'}))
  with pytest.raises(ValueError, match='records no recipe'):
    versus_random.run(study_config(), str(workdir))


def test_a_larger_num_random_extends_the_study_and_trains_only_the_new_nets(searched, tmp_path, monkeypatch):
  source, ratings = searched
  workdir = study_workdir(source, tmp_path / 'work')
  calls = []

  def fake_train(config, arch, directory, seed, epochs):
    calls.append((str(arch), seed))
    return {'accuracy': 0.9 - 0.1 * ratings_lib.architecture_rating(ratings, arch)['score'], 'raw_accuracy': 0.5}

  monkeypatch.setattr(studies, 'train_architecture', fake_train)
  versus_random.run(study_config(), str(workdir))
  first = json.loads((workdir / 'versus_random' / 'picked.json').read_text())['nets']
  calls.clear()
  grown = study_config()
  grown.versus_random.num_random = 8
  versus_random.run(grown, str(workdir))
  report = json.loads((workdir / 'versus_random' / 'summary.json').read_text())
  nets = json.loads((workdir / 'versus_random' / 'picked.json').read_text())['nets']
  assert nets[: len(first)] == first and len(nets) == len(first) + 3
  # only the three new nets are trained, each with both seeds
  assert sorted(calls) == sorted((n['arch'], s) for n in nets[len(first) :] for s in (3, 4))
  assert report['num_random'] == 8 and len(report['nets']) == len(nets)
  # the same nets as a study picked with 8 from the start
  fresh = study_workdir(source, tmp_path / 'fresh')
  assert versus_random.pick(grown, str(fresh), ratings) == nets
  # a study whose saved nets the sampler no longer draws first is refused, not mixed
  picked = workdir / 'versus_random' / 'picked.json'
  saved = json.loads(picked.read_text())
  saved['settings']['num_random'], saved['nets'] = 5, [first[0], first[1], *first[:1:-1]]
  picked.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match='cannot be extended'):
    versus_random.pick(grown, str(workdir), ratings)


def test_same_cells_picks_random_nets_of_the_chosen_nets_cells(searched, tmp_path):
  source, ratings = searched
  workdir = study_workdir(source, tmp_path / 'work')
  config = study_config()
  config.versus_random.same_cells = True
  nets = versus_random.pick(config, str(workdir), ratings)
  chosen = space_lib.locate(ratings.space, space_lib.from_string(nets[0]['arch']))
  randoms = [n for n in nets if n['role'] == 'random']
  assert len(randoms) == 5
  for net in randoms:
    assert space_lib.locate(ratings.space, space_lib.from_string(net['arch'])) == chosen
    assert abs(net['flops'] - nets[0]['flops']) <= 0.1 * nets[0]['flops']
  # The setting is part of the pick: resuming without it is refused.
  with pytest.raises(ValueError, match='same_cells'):
    versus_random.pick(study_config(), str(workdir), ratings)
