"""Ranking fidelity: rank correlations against scipy, bootstrap, the stratified pick, resume, reports."""

import csv
import importlib.util
import itertools
import json
import os

import numpy as np
import pytest
from scipy import stats

from dna_jax import config_base
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import stages
from dna_jax import studies
from dna_jax.stages import fidelity

# 42 x 6 x 12 = 3,024 architectures; block 2 reads two input widths.
SPACE = space_lib.parse_space('2 16 1@8,2@8; 2 24 1@12; 1 32 1@16,1@24', 8, 8, 32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

X = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0])
Y = np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0, 8.0, 4.0, 5.0])


@pytest.fixture(scope='module')
def rated(tmp_path_factory):
  """A workdir with random ratings of SPACE; returns (workdir, Ratings)."""
  workdir = tmp_path_factory.mktemp('rated')
  rng = np.random.default_rng(0)
  for k, block in enumerate(SPACE.blocks):
    scores = {c: rng.random(cell.num_paths) for c, cell in enumerate(block.cells)}
    ratings_lib.write_block_ratings(
      str(workdir / 'ratings'), SPACE, k, scores, scores, resolution=32, num_classes=10, stem_stride=1
    )
  return str(workdir), ratings_lib.read_ratings(str(workdir / 'ratings'))


def all_architectures(ratings):
  """(architecture, summed score) of every architecture of the space, by brute force."""
  per_block = [[(c, ops) for c, cell in enumerate(block.cells) for ops in cell.paths()] for block in SPACE.blocks]
  archs = [space_lib.make_architecture(SPACE, choices) for choices in itertools.product(*per_block)]
  return archs, np.array([ratings_lib.architecture_rating(ratings, a)['score'] for a in archs])


@pytest.mark.filterwarnings('ignore::scipy.stats.ConstantInputWarning')
@pytest.mark.parametrize('x, y', [(X, Y), (X, -X), (X, X), (X[:5], Y[:5]), (np.arange(8.0), np.ones(8))])
def test_correlations_match_scipy(x, y):
  np.testing.assert_allclose(rank_stats.kendall_tau(x, y), stats.kendalltau(x, y).statistic, atol=1e-12)
  np.testing.assert_allclose(rank_stats.spearman_rho(x, y), stats.spearmanr(x, y).statistic, atol=1e-12)
  np.testing.assert_allclose(rank_stats.average_ranks(x), stats.rankdata(x))


def test_correlations_batched_like_one_by_one():
  rng = np.random.default_rng(1)
  x, y = rng.integers(0, 4, (5, 9)).astype(float), rng.integers(0, 4, (5, 9)).astype(float)
  for statistic in (rank_stats.kendall_tau, rank_stats.spearman_rho):
    np.testing.assert_allclose(statistic(x, y), [statistic(a, b) for a, b in zip(x, y)])


def test_bootstrap_interval_contains_value_and_is_deterministic():
  first = rank_stats.with_interval(rank_stats.kendall_tau, X, Y, 500, seed=3)
  assert first == rank_stats.with_interval(rank_stats.kendall_tau, X, Y, 500, seed=3)
  assert first != rank_stats.with_interval(rank_stats.kendall_tau, X, Y, 500, seed=4)
  assert first['value'] == pytest.approx(stats.kendalltau(X, Y).statistic)
  assert first['low'] < first['value'] < first['high']
  rho = rank_stats.with_interval(rank_stats.spearman_rho, X, 2 * X + Y, 500, seed=3)
  assert rho['low'] < rho['value'] < rho['high'] <= 1


def test_pick_is_stratified_deterministic_and_keeps_search_and_lowest(rated):
  _, ratings = rated
  archs, scores = all_architectures(ratings)
  choice = archs[int(np.argsort(scores)[len(scores) // 3])]
  picks = fidelity.pick_architectures(ratings, 8, seed=5, search_choice=choice)
  assert [str(p['arch']) for p in picks] == [
    str(p['arch']) for p in fidelity.pick_architectures(ratings, 8, 5, search_choice=choice)
  ]
  assert [str(p['arch']) for p in picks] != [
    str(p['arch']) for p in fidelity.pick_architectures(ratings, 8, 6, search_choice=choice)
  ]
  names = [str(p['arch']) for p in picks]
  assert len(set(names)) == 8
  picked = np.array([ratings_lib.architecture_rating(ratings, p['arch'])['score'] for p in picks])
  assert np.all(np.diff(picked) >= 0)
  assert picks[0]['role'] == 'lowest' and picked[0] == scores.min()
  assert [p['role'] for p in picks].count('search') == 1 and str(choice) in names
  # one pick at least in every quartile of the space's scores, the top one included
  quartile = np.searchsorted(np.quantile(scores, [0.25, 0.5, 0.75]), picked)
  assert set(quartile) == {0, 1, 2, 3}


def test_noise_indices():
  assert fidelity.noise_indices(12, 2) == [4, 7]
  assert fidelity.noise_indices(12, 0) == []
  assert fidelity.noise_indices(3, 3) == [0, 1, 2]
  with pytest.raises(ValueError, match='noise_archs'):
    fidelity.noise_indices(3, 4)


class Killed(Exception):
  """Stands for the process being killed mid-study."""


def study_config(num_archs=6, noise_archs=2):
  config = config_base.get_base_config()
  config.seed = 7
  config.fidelity.update(dict(num_archs=num_archs, noise_archs=noise_archs, noise_seed=8, epochs=2, bootstrap=200))
  return config


def test_study_resumes_after_kill_without_retraining(rated, tmp_path, monkeypatch):
  source, ratings = rated
  workdir = tmp_path / 'work'
  workdir.mkdir()
  os.symlink(os.path.join(source, 'ratings'), workdir / 'ratings')
  config = study_config()
  calls = []

  def fake_train(config, arch, directory, seed, epochs, kill_at=None):
    """Accuracy falls with the summed score; the second seed adds 0.5 points."""
    calls.append((str(arch), seed, os.path.basename(directory)))
    if len(calls) == kill_at:
      raise Killed
    assert studies.recipe(config, epochs).epochs == 2
    score = ratings_lib.architecture_rating(ratings, arch)['score']
    return {'accuracy': 90.0 - 10 * score + (0.5 if seed == 8 else 0.0)}

  monkeypatch.setattr(studies, 'train_architecture', lambda *a: fake_train(*a, kill_at=3))
  with pytest.raises(Killed):
    fidelity.run(config, str(workdir))
  picked = (workdir / 'fidelity' / 'picked.json').read_text()
  assert len(calls) == 3
  killed = calls[2]
  # the search ran in between: a rerun still trains the saved pick
  (workdir / 'search').mkdir()
  (workdir / 'search' / 'arch_1.json').write_text(fidelity.pick_architectures(ratings, 3, 99)[1]['arch'].to_json())
  calls.clear()
  monkeypatch.setattr(studies, 'train_architecture', fake_train)
  summary = fidelity.run(config, str(workdir))
  assert (workdir / 'fidelity' / 'picked.json').read_text() == picked
  archs = [record['arch'] for record in json.loads(picked)['archs']]
  expected = [(a, 7, f'{i}_seed7') for i, a in enumerate(archs)] + [(archs[i], 8, f'{i}_seed8') for i in (2, 3)]
  assert calls[0] == killed and calls == expected[2:]
  calls.clear()
  assert fidelity.run(config, str(workdir)) == summary and not calls

  # the fake's accuracy is a falling function of the score: tau = rho = 1, noise exactly 0.5
  report = json.loads((workdir / 'fidelity' / 'fidelity.json').read_text())
  for key in ('kendall_tau', 'spearman_rho'):
    assert report[key] == {'value': 1.0, 'low': 1.0, 'high': 1.0}
  for key in ('flops_kendall_tau', 'flops_spearman_rho', 'params_kendall_tau', 'params_spearman_rho'):
    assert set(report[key]) == {'value', 'low', 'high'}
  assert report['num_archs'] == 6 and report['noise']['mean_abs_diff'] == pytest.approx(0.5)
  assert [a['index'] for a in report['noise']['per_arch']] == [2, 3]
  assert summary['kendall_tau'] == 1.0 and summary['num_archs'] == 6
  with open(workdir / 'fidelity' / 'fidelity.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['arch', 'score', 'flops', 'params', 'accuracy', 'seed'] and len(rows) == 8
  first = ratings_lib.architecture_rating(ratings, space_lib.from_string(rows[0]['arch']))
  assert (float(rows[0]['score']), int(rows[0]['flops']), int(rows[0]['params'])) == (
    first['score'],
    first['flops'],
    first['params'],
  )
  assert (workdir / 'fidelity' / 'fidelity.png').stat().st_size > 0
  assert os.listdir(workdir / 'fidelity' / 'tb')

  # another study size in the same directory is refused, not mixed
  with pytest.raises(ValueError, match='delete'):
    fidelity.run(study_config(num_archs=7), str(workdir))


def test_workdir_without_ratings_fails_with_the_stage_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match='run stages=rate first'):
    fidelity.run(study_config(), str(tmp_path))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name, base', [('demo_fidelity', 'demo'), ('imagenet_fidelity', 'imagenet_b7')])
def test_configs_fit_the_workdir_of_their_search(name, base):
  config, search_config = load_config(name), load_config(base)
  assert config.stages == 'fidelity' and config.fidelity.num_archs >= 10 and config.fidelity.epochs > 0
  for key in stages.IDENTITY_KEYS:
    assert stages.lookup(config, key) == stages.lookup(search_config, key), key


def test_command_line_reads_the_config_the_pipeline_saved(tmp_path):
  config = load_config('demo_fidelity')
  stages.check_workdir(config, str(tmp_path))
  assert config_base.saved_config(str(tmp_path)).to_dict() == config.to_dict()
  with pytest.raises(FileNotFoundError, match='pass --config'):
    config_base.saved_config(str(tmp_path / 'other'))


def test_a_shortened_study_run_keeps_the_schedule_shape():
  config = config_base.get_base_config()
  config.retrain.update(dict(epochs=1.5, warmup_epochs=0.3, ema_decay=0.999, ema_warmup=False))
  short = studies.recipe(config, 0.25)
  assert (short.epochs, short.eval_every_epochs, short.ema_warmup) == (0.25, 0.25, True)
  assert short.warmup_epochs == pytest.approx(0.05)
  for epochs in (0, 1.5, 3.0):  # the recipe itself, or longer: as configured
    same = studies.recipe(config, epochs)
    assert (same.warmup_epochs, same.ema_warmup, same.epochs) == (0.3, False, epochs or 1.5)
  assert config.retrain.warmup_epochs == 0.3  # the config is not changed
