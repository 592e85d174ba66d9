"""Ranking fidelity: do the block ratings rank architectures the way their trained accuracy does?

Picks `fidelity.num_archs` architectures spread over the range of summed block scores (always the
search's choice and the lowest-scoring net of the space), trains each one from scratch with the
retrain recipe (`fidelity.epochs` epochs when > 0), and reports Kendall tau and Spearman rho between
minus the summed score and test top-1, with bootstrap 95% intervals, beside the same correlations
for the trivial proxies FLOPs and params. `fidelity.noise_archs` of the nets are trained again with
`fidelity.noise_seed` to show how much accuracy differs between two trainings of the same net.

Layout of WORKDIR/fidelity/:
  picked.json    the architectures, written before any training; a rerun reads it, never re-picks
  runs/I_seedS/  one training run: arch.json, Orbax checkpoints (resumed), result.json once finished
  fidelity.csv   arch,score,flops,params,accuracy,seed: one row per run
  fidelity.json  correlations with intervals, training noise
  fidelity.png   accuracy against summed score, FLOPs and params
  tb/            the same scalars for TensorBoard

Run in a workdir that holds ratings (stages rate, and optionally search, done):
  python -m dna_jax.main --config CONFIG --workdir DIR --config.stages=fidelity
  python -m dna_jax.stages.fidelity --workdir DIR [--config CONFIG]   (default: the config in DIR/config.json)
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
from dna_jax import search as search_lib
from dna_jax import space as space_lib
from dna_jax import studies
from dna_jax import workdir as workdir_lib

# ----------------------------------------------------------------------------- picking architectures


def pick_architectures(
  ratings: ratings_lib.Ratings,
  num_archs: int,
  seed: int,
  search_choice: space_lib.Architecture | None = None,
  sample_size: int = 20_000,
) -> list[dict[str, Any]]:
  """`num_archs` distinct architectures spread over the range of summed scores, sorted by score.

  Always the lowest-scoring architecture of the space (exact) and `search_choice` if given; the
  others one per equal-count bin (a quantile bin) of the summed scores of `sample_size` random
  architectures, drawn at random within the bin. Deterministic for a seed. Each entry:
  {'arch': Architecture, 'role': 'search' | 'lowest' | 'search,lowest' | 'sample', 'rows': (...)}.
  """
  if num_archs < 3:
    raise ValueError(f'fidelity.num_archs must be >= 3 for a rank correlation, got {num_archs}')
  fixed: dict[tuple[int, ...], str] = {}
  if search_choice is not None:
    rows = ratings_lib.architecture_rows(ratings, search_choice)
    if rows is None:
      raise ValueError(
        f'the search choice {search_choice} is not in the space of the ratings in '
        f'{ratings.directory}; rerun stages=search on these ratings'
      )
    fixed[rows] = 'search'
  lowest = search_lib.search(ratings, top_k=1)[0].rows
  fixed[lowest] = 'search,lowest' if lowest in fixed else 'lowest'
  slots = num_archs - len(fixed)
  rng = np.random.default_rng(seed)
  sample = np.unique(random_nets.sample_architectures(ratings, sample_size, rng), axis=0)
  sample = sample[[tuple(int(r) for r in rows) not in fixed for rows in sample]]
  if len(sample) < slots:
    raise ValueError(
      f'fidelity.num_archs={num_archs} but only {len(sample) + len(fixed)} distinct architectures '
      f'were found in {sample_size:,} draws from a space of {ratings.space.num_architectures:,}: '
      'lower fidelity.num_archs'
    )
  order = np.argsort(random_nets.summed_scores(ratings, sample), kind='stable')
  bins = np.array_split(order, slots)  # equal-count bins of increasing score
  chosen = [members[rng.integers(len(members))] for members in bins]
  picks = list(fixed.items())
  picks += [(tuple(int(r) for r in sample[i]), 'sample') for i in chosen]
  scores = random_nets.summed_scores(ratings, np.array([rows for rows, _ in picks]))
  return [
    {'arch': random_nets.architecture(ratings, picks[i][0]), 'role': picks[i][1], 'rows': picks[i][0]}
    for i in np.argsort(scores, kind='stable')
  ]


def noise_indices(num_archs: int, noise_archs: int) -> list[int]:
  """Which of the (score-sorted) picks are trained twice: evenly spaced, extremes left out."""
  if not 0 <= noise_archs <= num_archs:
    raise ValueError(f'fidelity.noise_archs must lie in [0, num_archs={num_archs}], got {noise_archs}')
  if noise_archs < num_archs - 1:
    positions = np.linspace(0, num_archs - 1, noise_archs + 2)[1:-1]
  else:
    positions = np.linspace(0, num_archs - 1, noise_archs)
  return [int(i) for i in np.round(positions)]


# ----------------------------------------------------------------------------- files


def load_ratings(workdir: str) -> ratings_lib.Ratings:
  """WORKDIR/ratings, or an error naming the stage that makes them."""
  directory = workdir_lib.Workdir(workdir).ratings
  if not (directory / ratings_lib.META).exists():
    raise FileNotFoundError(
      f'no ratings in {directory}: the fidelity study needs them; run stages=rate first '
      '(in this workdir, with the same config)'
    )
  try:
    return ratings_lib.read_ratings(os.fspath(directory))
  except ValueError as e:
    raise ValueError(f'{e}; run stages=rate first (it resumes and completes the ratings)') from None


def search_choice(workdir: str) -> space_lib.Architecture | None:
  """WORKDIR/search/arch_1.json if the search ran, else None."""
  path = workdir_lib.Workdir(workdir).arch(1)
  return space_lib.load_architecture(os.fspath(path)) if path.exists() else None


def _pick_record(ratings: ratings_lib.Ratings, pick: dict[str, Any], index: int) -> dict[str, Any]:
  rating = ratings_lib.architecture_rating(ratings, pick['arch'])
  return {
    'index': index,
    'arch': str(pick['arch']),
    'role': pick['role'],
    'score': rating['score'],
    'flops': rating['flops'],
    'params': rating['params'],
  }


def load_or_pick(config: ml_collections.ConfigDict, workdir: str, ratings: ratings_lib.Ratings) -> list[dict[str, Any]]:
  """The picks of WORKDIR/fidelity/picked.json, or a new pick written there; rated records sorted by score."""
  fc = config.fidelity
  path = workdir_lib.Workdir(workdir).fidelity / 'picked.json'
  if path.exists():
    saved = json.loads(path.read_text())
    if (saved['num_archs'], saved['seed']) != (fc.num_archs, config.seed):
      raise ValueError(
        f'{path} holds {saved["num_archs"]} architectures picked with seed {saved["seed"]}, but '
        f'fidelity.num_archs={fc.num_archs}, seed={config.seed}: restore those values to resume, '
        f'or delete {path.parent} to start a new study'
      )
    picks = []
    for record in saved['archs']:
      arch = space_lib.from_string(record['arch'])
      if ratings_lib.architecture_rating(ratings, arch) is None:
        raise ValueError(
          f'{path}: {record["arch"]} is not in the space of {ratings.directory}; delete '
          f'{path.parent} to start a new study on these ratings'
        )
      picks.append(_pick_record(ratings, {'arch': arch, 'role': record['role']}, record['index']))
    logging.info('Read %d architectures from %s.', len(picks), path)
    return picks
  picks = [
    _pick_record(ratings, pick, i)
    for i, pick in enumerate(
      pick_architectures(ratings, fc.num_archs, config.seed, search_choice(workdir), fc.sample_size)
    )
  ]
  record = {
    'num_archs': fc.num_archs,
    'seed': config.seed,
    'sample_size': fc.sample_size,
    'ratings': ratings.directory,
    'archs': picks,
  }
  if jax.process_index() == 0:
    files.write_json(path, record)
  logging.info(
    'Picked %d architectures (summed scores %.4f..%.4f), written to %s.',
    len(picks),
    picks[0]['score'],
    picks[-1]['score'],
    path,
  )
  return picks


# ----------------------------------------------------------------------------- training


def train_once(config: ml_collections.ConfigDict, workdir: str, pick: dict[str, Any], seed: int) -> dict[str, Any]:
  """One run of the study (studies.train_once: resumed, never trained twice)."""
  study = workdir_lib.Workdir(workdir).fidelity
  return studies.train_once(config, study, pick['index'], pick['arch'], seed, config.fidelity.epochs)


# ----------------------------------------------------------------------------- report


def study_report(
  picks: Sequence[dict[str, Any]],
  accuracy: dict[tuple[int, int], float],
  seed: int,
  noise_seed: int,
  resamples: int,
  level: float = 0.95,
) -> dict[str, Any]:
  """The fidelity.json record: correlations on the `seed` runs, noise from the repeated ones."""
  acc = [accuracy[p['index'], seed] for p in picks]
  report: dict[str, Any] = {
    'num_archs': len(picks),
    'seeds': [seed, noise_seed],
    'bootstrap': resamples,
    'level': level,
  }
  proxies = (
    ('', [-p['score'] for p in picks]),
    ('flops_', [p['flops'] for p in picks]),
    ('params_', [p['params'] for p in picks]),
  )
  for prefix, quality in proxies:
    for name, value in rank_stats.correlations(quality, acc, resamples, seed, level).items():
      report[prefix + name] = value
  per_arch = [
    {
      'index': p['index'],
      'arch': p['arch'],
      'accuracy': [accuracy[p['index'], seed], accuracy[p['index'], noise_seed]],
      'abs_diff': abs(accuracy[p['index'], seed] - accuracy[p['index'], noise_seed]),
    }
    for p in picks
    if (p['index'], noise_seed) in accuracy
  ]
  report['noise'] = {
    'per_arch': per_arch,
    'mean_abs_diff': float(np.mean([a['abs_diff'] for a in per_arch])) if per_arch else None,
  }
  return report


def csv_text(picks: Sequence[dict[str, Any]], accuracy: dict[tuple[int, int], float]) -> str:
  """fidelity.csv: one row per run (architecture and seed)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['arch', 'score', 'flops', 'params', 'accuracy', 'seed'])
  by_index = {p['index']: p for p in picks}
  for (index, seed), value in sorted(accuracy.items()):
    p = by_index[index]
    writer.writerow([p['arch'], repr(p['score']), p['flops'], p['params'], repr(value), seed])
  return out.getvalue()


ROLE_LABELS = {
  'lowest': 'best rated (lowest score)',
  'search': "search's choice",
  'search,lowest': "search's choice, best rated",
  'sample': 'stratified sample',
}


def plot_study(
  picks: Sequence[dict[str, Any]],
  accuracy: dict[tuple[int, int], float],
  report: dict[str, Any],
  seed: int,
  path_png: str,
) -> None:
  """Three panels: accuracy against summed score, FLOPs and params; a net's second-seed run linked by a line."""
  plt = files.pyplot()
  colors = {'sample': 'tab:blue', 'lowest': 'tab:green', 'search': 'tab:red', 'search,lowest': 'tab:red'}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
  panels = (
    ('score', 1, 'summed block score (lower = rated better)', ''),
    ('flops', 1e6, 'FLOPs (M)', 'flops_'),
    ('params', 1e6, 'parameters (M)', 'params_'),
  )
  for ax, (field, unit, label, prefix) in zip(axes, panels):
    for p in picks:
      x, y = p[field] / unit, 100 * accuracy[p['index'], seed]
      for (index, other_seed), other in accuracy.items():
        if index == p['index'] and other_seed != seed:
          ax.plot([x, x], [y, 100 * other], color='0.6', lw=1)
          ax.plot(x, 100 * other, '.', color='0.4', ms=6, label='second seed')
      ax.plot(x, y, 'o', color=colors[p['role']], ms=6, label=ROLE_LABELS.get(p['role'], p['role']))
    tau, rho = report[prefix + 'kendall_tau'], report[prefix + 'spearman_rho']
    ax.set_title(
      f'Kendall tau {tau["value"]:.2f} [{tau["low"]:.2f}, {tau["high"]:.2f}]   '
      f'Spearman rho {rho["value"]:.2f} [{rho["low"]:.2f}, {rho["high"]:.2f}]',
      fontsize=9,
    )
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  axes[0].legend(unique.values(), unique.keys(), fontsize=8)
  axes[0].set_ylabel('test top-1 (%)')
  noise = report['noise']['mean_abs_diff']
  fig.suptitle(
    f'Ranking fidelity of {len(picks)} architectures ({100 * report["level"]:.0f}% bootstrap intervals)'
    + (f'; two seeds differ by {100 * noise:.2f} points on average' if noise is not None else '')
  )
  fig.tight_layout()
  files.save_figure(fig, path_png)


def write_outputs(
  workdir: str,
  picks: Sequence[dict[str, Any]],
  accuracy: dict[tuple[int, int], float],
  report: dict[str, Any],
  seed: int,
) -> None:
  """fidelity.csv, fidelity.json, fidelity.png and TensorBoard scalars (process 0)."""
  root = workdir_lib.Workdir(workdir).fidelity
  if jax.process_index() == 0:
    files.atomic_write_text(root / 'fidelity.csv', csv_text(picks, accuracy))
    files.write_json(root / 'fidelity.json', report)
  scalars = {
    f'fidelity/{key}': value['value'] for key, value in report.items() if isinstance(value, dict) and 'value' in value
  }
  scalars.update(
    {
      f'fidelity/{key}_{bound}': value[bound]
      for key, value in report.items()
      if isinstance(value, dict) and 'value' in value
      for bound in ('low', 'high')
    }
  )
  if report['noise']['mean_abs_diff'] is not None:
    scalars['fidelity/noise_mean_abs_diff'] = report['noise']['mean_abs_diff']
  writer = metric_writers.create_default_writer(os.fspath(root / 'tb'), just_logging=jax.process_index() > 0)
  writer.write_scalars(0, scalars)
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    plot_study(picks, accuracy, report, seed, os.fspath(root / 'fidelity.png'))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The fidelity stage: pick, train every pick (resuming), report."""
  fc = config.fidelity
  if fc.noise_archs and fc.noise_seed == config.seed:
    raise ValueError(f'fidelity.noise_seed must differ from seed ({config.seed}) to measure training noise')
  studies.check_weights(fc.weights, 'fidelity.weights')
  ratings = load_ratings(workdir)
  picks = load_or_pick(config, workdir, ratings)
  plan = [(p, config.seed) for p in picks] + [
    (picks[i], fc.noise_seed) for i in noise_indices(len(picks), fc.noise_archs)
  ]
  epochs = studies.recipe(config, fc.epochs).epochs
  logging.info('Fidelity study: %d training runs of %s epochs each.', len(plan), epochs)
  accuracy = {}
  for pick, seed in plan:
    accuracy[pick['index'], seed] = studies.accuracy(train_once(config, workdir, pick, seed), fc.weights)
  report = study_report(picks, accuracy, config.seed, fc.noise_seed, fc.bootstrap, fc.level)
  report['epochs'] = epochs
  report['weights'] = fc.weights
  write_outputs(workdir, picks, accuracy, report, config.seed)
  tau, rho = report['kendall_tau'], report['spearman_rho']
  noise = report['noise']['mean_abs_diff']
  logging.info(
    'Ranking fidelity over %d architectures: Kendall tau %.3f [%.3f, %.3f], Spearman rho %.3f '
    '[%.3f, %.3f]; FLOPs tau %.3f, params tau %.3f; two seeds differ by %s top-1 points on average.',
    len(picks),
    tau['value'],
    tau['low'],
    tau['high'],
    rho['value'],
    rho['low'],
    rho['high'],
    report['flops_kendall_tau']['value'],
    report['params_kendall_tau']['value'],
    'n/a' if noise is None else f'{100 * noise:.2f}',
  )
  return {
    'kendall_tau': tau['value'],
    'spearman_rho': rho['value'],
    'flops_kendall_tau': report['flops_kendall_tau']['value'],
    'params_kendall_tau': report['params_kendall_tau']['value'],
    'noise_mean_abs_diff': report['noise']['mean_abs_diff'],
    'num_archs': len(picks),
  }


# ----------------------------------------------------------------------------- command line


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'Workdir holding ratings (WORKDIR/ratings).', flag_values=FLAGS)
config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file (default: the config saved in WORKDIR/config.json).',
  flag_values=FLAGS,
  lock_config=True,
)
flags.mark_flag_as_required('workdir', flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  config = FLAGS.config if FLAGS.config is not None else config_base.saved_config(FLAGS.workdir)
  print(json.dumps(run(config, FLAGS.workdir), indent=1))
  print(f'Report: {workdir_lib.Workdir(FLAGS.workdir).fidelity / "fidelity.json"}')


if __name__ == '__main__':
  cli.run(main, FLAGS)
