"""Search versus random: does the search's choice beat random nets of the same cost, trained the same way?

From a rated and searched workdir: the search's top-k nets (WORKDIR/search/arch_1..k.json, arch_1
being the chosen net) and `num_random` nets drawn uniformly from the space among those whose FLOPs
lie within `tolerance` of the chosen net's (with `same_cells`, only nets made of the chosen net's cells:
the same depth and widths, other ops), each trained from scratch with the retrain recipe
(`epochs` when > 0) with `seeds` seeds. Reported (summary.json):
  - the chosen net's mean accuracy, its rank and percentile among the random nets' means, with a
    bootstrap interval (random nets and seeds resampled);
  - the probability that a training of the chosen net beats a training of a random equal-cost net;
  - the mean accuracy of the top-k against the random nets';
  - Kendall tau of ratings and accuracy with FLOPs held fixed (partial tau), with an interval, over
    every trained net: what a rating adds over the budget the search already enforces; plain tau
    of ratings and of FLOPs beside it;
  - the seed noise: the mean standard deviation of a net's accuracy over seeds.
A run's accuracy is the test top-1 of its EMA or its final weights (`weights`).
Targets (README): percentile above 90 with its interval above 50, partial tau above 0 with its
interval.

Layout of WORKDIR/versus_random/:
  picked.json         the nets, written before any training; a rerun reads it, never re-picks (a larger
                      num_random adds nets after the saved ones)
  runs/I_seedS/       one training run (studies.py): resumed when killed, never retrained when done
  runs.csv            arch,role,flops,params,score,seed,accuracy: one row per run (role searched|random)
  summary.json        the statistics above
  versus_random.png   accuracy against FLOPs: random nets grey, the searched nets red, seed spread as bars
  tb/                 the scalars for TensorBoard

  python -m dna_jax.main --config CONFIG --workdir DIR --config.stages=versus_random
  python -m dna_jax.stages.versus_random --workdir DIR [--config CONFIG]
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import io
import json
import os
from typing import Any

from absl import flags
from absl import logging
from clu import metric_writers
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from dna_jax import cli
from dna_jax import config_base
from dna_jax import files
from dna_jax import random_nets
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import studies
from dna_jax import workdir as workdir_lib

COLUMNS = ('arch', 'role', 'flops', 'params', 'score', 'seed', 'accuracy')


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
  return [config.seed + i for i in range(config.versus_random.seeds)]


def _record(ratings: ratings_lib.Ratings, arch: space_lib.Architecture, index: int, role: str) -> dict[str, Any]:
  rating = ratings_lib.architecture_rating(ratings, arch)
  if rating is None:
    raise ValueError(f'{arch} is not in the space of the ratings in {ratings.directory}; rerun stages=search')
  return {'index': index, 'arch': str(arch), 'role': role, **{k: rating[k] for k in ('score', 'flops', 'params')}}


def pick(config: ml_collections.ConfigDict, workdir: str, ratings: ratings_lib.Ratings) -> list[dict[str, Any]]:
  """The search's top-k, then the random equal-cost nets; read from picked.json when it exists.

  A study picked with fewer random nets (all else equal) is extended: the equal-cost sampler draws the
  same nets first from the same seed, so the saved nets keep their indices and finished runs, and only
  the new nets are trained.
  """
  vc = config.versus_random
  paths = workdir_lib.Workdir(workdir)
  path = paths.versus_random / 'picked.json'
  settings = {'num_random': vc.num_random, 'tolerance': vc.tolerance, 'top_k': vc.top_k, 'seed': config.seed}
  if vc.same_cells:  # only when set: studies picked before the option existed resume unchanged
    settings['same_cells'] = True
  saved = None
  if path.exists():
    saved = json.loads(path.read_text())
    if saved['settings'] == settings:
      return saved['nets']
    grown = {**saved['settings'], 'num_random': vc.num_random} == settings
    if not grown or vc.num_random < saved['settings']['num_random']:
      raise ValueError(
        f'{path} was picked with {saved["settings"]}, the config asks for {settings}: restore those values to '
        f'resume (a larger num_random extends the study), or delete {path.parent} to start a new study'
      )
  nets = _pick_anew(config, paths, ratings)
  if saved is not None:
    if [n['arch'] for n in nets[: len(saved['nets'])]] != [n['arch'] for n in saved['nets']]:
      raise ValueError(
        f'{path}: the nets picked now do not begin with the saved ones (the ratings or the search changed since '
        f'the study began), so the study cannot be extended; delete {path.parent} to start a new study'
      )
    logging.info(
      'Extending the study from %d to %d random nets; the runs of the first %d nets are kept.',
      saved['settings']['num_random'],
      vc.num_random,
      len(saved['nets']),
    )
  if jax.process_index() == 0:
    files.write_json(path, {'settings': settings, 'ratings': ratings.directory, 'nets': nets})
  logging.info(
    'Picked the search top-%d and %d random nets within %.0f%% of %d FLOPs, written to %s.',
    vc.top_k,
    vc.num_random,
    100 * vc.tolerance,
    nets[0]['flops'],
    path,
  )
  return nets


def _pick_anew(
  config: ml_collections.ConfigDict, paths: workdir_lib.Workdir, ratings: ratings_lib.Ratings
) -> list[dict[str, Any]]:
  vc = config.versus_random
  searched = []
  for rank in range(1, vc.top_k + 1):
    if not paths.arch(rank).exists():
      raise FileNotFoundError(
        f'{paths.arch(rank)} does not exist: versus_random needs the search top-{vc.top_k}; run stages=search '
        f'with search.top_k >= {vc.top_k} first'
      )
    searched.append(space_lib.load_architecture(os.fspath(paths.arch(rank))))
  nets = [_record(ratings, arch, i, 'searched') for i, arch in enumerate(searched)]
  exclude = [ratings_lib.architecture_rows(ratings, arch) for arch in searched]
  rng = np.random.default_rng(config.seed)
  cells = space_lib.locate(ratings.space, searched[0]) if vc.same_cells else None
  rows = random_nets.equal_cost(ratings, nets[0]['flops'], vc.tolerance, vc.num_random, rng, exclude, vc.draws, cells)
  return nets + [
    _record(ratings, random_nets.architecture(ratings, r), len(nets) + i, 'random') for i, r in enumerate(rows)
  ]


def accuracy_table(
  nets: Sequence[dict[str, Any]], runs: dict[tuple[int, int], float], seeds: Sequence[int]
) -> np.ndarray:
  """(nets, seeds) accuracies."""
  return np.array([[runs[net['index'], s] for s in seeds] for net in nets])


def study_report(
  nets: Sequence[dict[str, Any]], runs: dict[tuple[int, int], float], config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """summary.json: the chosen net against the random ones, partial tau, seed noise, targets."""
  vc, seeds = config.versus_random, seeds_of(config)
  searched = [n for n in nets if n['role'] == 'searched']
  table = accuracy_table(nets, runs, seeds)
  top, random = table[: len(searched)], table[len(searched) :]
  report: dict[str, Any] = {
    'chosen': searched[0]['arch'],
    'chosen_flops': searched[0]['flops'],
    'top_k': len(searched),
    'seeds': seeds,
    'tolerance': vc.tolerance,
    'same_cells': bool(vc.same_cells),
    'bootstrap': vc.bootstrap,
    'level': vc.level,
    **rank_stats.versus_random(top[0], random, top, vc.bootstrap, config.seed, vc.level),
  }
  quality = np.array([-n['score'] for n in nets])
  flops = np.array([n['flops'] for n in nets], np.float64)
  mean = table.mean(1)
  report['partial_kendall_tau'] = rank_stats.with_interval_of(
    rank_stats.partial_kendall_tau, (quality, mean, flops), vc.bootstrap, config.seed, vc.level
  )
  report['kendall_tau'] = rank_stats.with_interval(
    rank_stats.kendall_tau, quality, mean, vc.bootstrap, config.seed, vc.level
  )
  report['flops_kendall_tau'] = rank_stats.with_interval(
    rank_stats.kendall_tau, flops, mean, vc.bootstrap, config.seed, vc.level
  )
  report['seed_std'] = float(np.mean(table.std(1, ddof=1))) if len(seeds) > 1 else None
  report['random_flops'] = [float(flops[len(searched) :].min()), float(flops[len(searched) :].max())]
  report['targets'] = {
    'percentile_above_90': report['percentile']['value'] > 90 and report['percentile']['low'] > 50,
    'partial_tau_above_0': report['partial_kendall_tau']['low'] > 0,
  }
  report['nets'] = [{**n, 'accuracy': [runs[n['index'], s] for s in seeds]} for n in nets]
  return report


def csv_text(nets: Sequence[dict[str, Any]], runs: dict[tuple[int, int], float], seeds: Sequence[int]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(COLUMNS)
  for net in nets:
    for seed in seeds:
      accuracy = runs[net['index'], seed]
      writer.writerow([net['arch'], net['role'], net['flops'], net['params'], repr(net['score']), seed, repr(accuracy)])
  return out.getvalue()


def plot(nets: Sequence[dict[str, Any]], report: dict[str, Any], seeds: Sequence[int], runs, path_png: str) -> None:
  """Accuracy against FLOPs: random nets grey, the search's top-k red (the chosen net a star), seed spread as bars."""
  plt = files.pyplot()
  table = accuracy_table(nets, runs, seeds) * 100
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for net, accuracies in zip(nets, table):
    searched = net['role'] == 'searched'
    chosen = searched and net is nets[0]
    ax.errorbar(
      net['flops'] / 1e6,
      accuracies.mean(),
      yerr=accuracies.std(ddof=1) if len(seeds) > 1 else None,
      fmt='*' if chosen else 'o',
      ms=12 if chosen else 6,
      color='tab:red' if searched else '0.6',
      capsize=3,
      label='chosen by the search' if chosen else ('search top-k' if searched else 'random, equal cost'),
    )
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8)
  p, t = report['percentile'], report['partial_kendall_tau']
  ax.set_title(
    f'chosen net: percentile {p["value"]:.0f} [{p["low"]:.0f}, {p["high"]:.0f}] among {report["num_random"]} random nets; '
    f'partial tau {t["value"]:.2f} [{t["low"]:.2f}, {t["high"]:.2f}]',
    fontsize=8,
  )
  ax.set_xlabel('FLOPs (M)')
  weights = {'ema': 'EMA weights', 'raw': 'final weights'}[report.get('weights', 'ema')]
  ax.set_ylabel(f'test top-1 (%, {weights}), mean and std over {len(seeds)} seed{"s" if len(seeds) > 1 else ""}')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path_png)


def write_outputs(workdir: str, nets, runs, report: dict[str, Any], seeds: Sequence[int]) -> None:
  root = workdir_lib.Workdir(workdir).versus_random
  scalars = {
    f'versus_random/{key}': value['value']
    for key, value in report.items()
    if isinstance(value, dict) and 'value' in value
  }
  writer = metric_writers.create_default_writer(os.fspath(root / 'tb'), just_logging=jax.process_index() > 0)
  writer.write_scalars(0, scalars)
  writer.close()
  if jax.process_index() == 0:
    files.atomic_write_text(root / 'runs.csv', csv_text(nets, runs, seeds))
    files.write_json(root / 'summary.json', report)
    plot(nets, report, seeds, runs, os.fspath(root / 'versus_random.png'))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The versus_random stage: pick, train every net with every seed (resuming), report."""
  vc = config.versus_random
  if vc.seeds < 1 or vc.num_random < 2 or vc.top_k < 1 or not 0 < vc.tolerance < 1:
    raise ValueError('versus_random needs seeds >= 1, num_random >= 2, top_k >= 1 and 0 < tolerance < 1')
  studies.check_weights(vc.weights, 'versus_random.weights')
  paths = workdir_lib.Workdir(workdir)
  if not (paths.ratings / ratings_lib.META).exists():
    raise FileNotFoundError(f'no ratings in {paths.ratings}: run stages=rate,search first (same config)')
  ratings = ratings_lib.read_ratings(os.fspath(paths.ratings))
  nets = pick(config, workdir, ratings)
  seeds = seeds_of(config)
  epochs = studies.recipe(config, vc.epochs).epochs
  logging.info('Versus random: %d nets x %d seeds, %s epochs each.', len(nets), len(seeds), epochs)
  runs = {}
  for seed in seeds:  # every net once before any second seed: a killed study has the most to report
    for net in nets:
      result = studies.train_once(config, paths.versus_random, net['index'], net['arch'], seed, vc.epochs)
      runs[net['index'], seed] = studies.accuracy(result, vc.weights)
  report = study_report(nets, runs, config)
  report['epochs'] = epochs
  report['weights'] = vc.weights
  write_outputs(workdir, nets, runs, report, seeds)
  p, t = report['percentile'], report['partial_kendall_tau']
  logging.info(
    'Chosen net %.2f%% (rank %d of %d): percentile %.0f [%.0f, %.0f], beats a random net with p %.2f; '
    'partial tau given FLOPs %.2f [%.2f, %.2f].',
    100 * report['chosen_mean'],
    report['rank'],
    report['num_random'] + 1,
    p['value'],
    p['low'],
    p['high'],
    report['beat_probability']['value'],
    t['value'],
    t['low'],
    t['high'],
  )
  return {
    'chosen_mean': report['chosen_mean'],
    'percentile': p['value'],
    'beat_probability': report['beat_probability']['value'],
    'partial_kendall_tau': t['value'],
  }


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'A rated and searched workdir.', flag_values=FLAGS)
config_flags.DEFINE_config_file(
  'config', None, 'Config file (default: the config saved in WORKDIR/config.json).', flag_values=FLAGS, lock_config=True
)
flags.mark_flag_as_required('workdir', flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  config = FLAGS.config if FLAGS.config is not None else config_base.saved_config(FLAGS.workdir)
  print(json.dumps(run(config, FLAGS.workdir), indent=1))
  print(f'Report: {workdir_lib.Workdir(FLAGS.workdir).versus_random / "summary.json"}')


if __name__ == '__main__':
  cli.run(main, FLAGS)
