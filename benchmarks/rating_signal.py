"""What the ratings say under different distillation lengths, samplings and rating sizes.

  PYTHONPATH=. python benchmarks/rating_signal.py --ratings NAME=DIR [--ratings NAME=DIR ...]
      [--runs W/versus_random/runs.csv] [--max_flops 2200000] [--resamples 2000]

For each ratings directory (a workdir's `ratings/`, rated exhaustively): per block and cell, the best
and the median path score (does one cell win because it is shallower?); the search's choice under
--max_flops; Kendall tau of every path's score against the first directory's. With --runs (a
versus_random study's runs.csv: nets trained from scratch, several seeds each), every trained net is
rated with each directory's scores and its summed rating is set against its mean test accuracy:
Kendall tau and the partial tau given FLOPs and given the number of layers, with 95% bootstrap
intervals over the nets; the same for the proxies "fewer layers" and "fewer FLOPs"; and, where every
net has two seeds or more, the noise ceiling: Kendall tau of the nets' accuracies under one seed
against another (how well one training ranks the nets against a second one). The trained nets stay
fixed; only the ratings change, so no net is trained again.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

import numpy as np

from dna_jax import host_memory
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib


def cell_summary(ratings: ratings_lib.Ratings) -> list[str]:
  """Per block and cell: best and median path score (over every input width's rows)."""
  lines = []
  for k, (block, rated) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    parts = []
    for c, cell in enumerate(block.cells):
      scores = rated.score[rated.cell == c]
      parts.append(f'{cell.name} best {scores.min():.3f} median {np.median(scores):.3f}')
    lines.append(f'block {k + 1}: ' + '; '.join(parts))
  return lines


def trained_nets(path: str) -> dict[str, dict[int, float]]:
  """The test accuracies of a versus_random runs.csv: {arch: {seed: accuracy}}."""
  runs = collections.defaultdict(dict)
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      runs[row['arch']][int(row['seed'])] = float(row['accuracy'])
  return dict(runs)


def seed_to_seed_tau(nets: dict[str, dict[int, float]], resamples: int) -> dict[str, float] | None:
  """Kendall tau of the nets' accuracies under the first two seeds they all share; None if fewer."""
  shared = sorted(set.intersection(*(set(seeds) for seeds in nets.values())))
  if len(shared) < 2:
    return None
  first, second = ([nets[a][seed] for a in sorted(nets)] for seed in shared[:2])
  return rank_stats.with_interval(rank_stats.kendall_tau, first, second, resamples, 0)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ratings', action='append', required=True, help='NAME=DIR, a ratings directory')
  parser.add_argument('--runs', default='', help="a versus_random study's runs.csv")
  parser.add_argument('--max_flops', type=float, default=2_200_000)
  parser.add_argument('--resamples', type=int, default=2000)
  args = parser.parse_args(argv)
  named = []
  for item in args.ratings:
    name, sep, directory = item.partition('=')
    if not sep:
      parser.error(f'--ratings {item!r}: expected NAME=DIR')
    named.append((name, ratings_lib.read_ratings(directory)))
  nets = trained_nets(args.runs) if args.runs else {}
  archs = sorted(nets)
  parsed = [space_lib.from_string(a) for a in archs]
  accuracy = np.array([np.mean(list(nets[a].values())) for a in archs])
  layers_ = np.array([sum(choice.cell.layers for choice in arch.blocks) for arch in parsed], np.float64)
  reference = np.concatenate([b.score for b in named[0][1].blocks])
  table = []
  covering = []  # the ratings directories that rate every trained net
  for name, ratings in named:
    print(f'## {name} ({ratings.directory})')
    for line in cell_summary(ratings):
      print(f'- {line}')
    try:
      best = search_lib.search(ratings, max_flops=int(args.max_flops))[0]
    except ValueError as e:  # a budget outside this space (e.g. below its cheapest net)
      best = None
      print(f'- search under {args.max_flops / 1e6:.2f} MFLOPs: none ({e})')
    else:
      print(f'- search under {args.max_flops / 1e6:.2f} MFLOPs: {best.architecture} ({best.flops / 1e6:.2f} MFLOPs)')
    scores = np.concatenate([b.score for b in ratings.blocks])
    tau_ref = float(rank_stats.kendall_tau(scores, reference)) if len(scores) == len(reference) else float('nan')
    row = {'name': name, 'choice': str(best.architecture) if best else 'none', 'tau_vs_first': tau_ref}
    rated = [ratings_lib.architecture_rating(ratings, arch) for arch in parsed]
    outside = sum(r is None for r in rated)
    if outside:  # rated on another space (other cells or widths): no rating for these nets
      print(f'- {outside} of the {len(parsed)} trained nets are not in this space: not set against accuracy')
    else:
      covering.append(rated)
    if nets and not outside:
      quality = np.array([-r['score'] for r in rated])
      flops = np.array([r['flops'] for r in rated], np.float64)
      row['tau'] = rank_stats.with_interval(rank_stats.kendall_tau, quality, accuracy, args.resamples, 0)
      row['partial'] = rank_stats.with_interval_of(
        rank_stats.partial_kendall_tau, (quality, accuracy, flops), args.resamples, 0
      )
      row['partial_layers'] = rank_stats.with_interval_of(
        rank_stats.partial_kendall_tau, (quality, accuracy, layers_), args.resamples, 0
      )
    table.append(row)
    print()
  interval = lambda d: f'{d["value"]:.2f} [{d["low"]:.2f}, {d["high"]:.2f}]'
  if nets and not covering:
    print('- no ratings directory holds every trained net: no proxies\n')
  elif nets:
    # Proxies that need no rating, on the same nets: fewer layers, fewer FLOPs.
    flops = np.array([r['flops'] for r in covering[0]], np.float64)
    for label, proxy in (('fewer layers', -layers_), ('fewer FLOPs', -flops)):
      tau = rank_stats.with_interval(rank_stats.kendall_tau, proxy, accuracy, args.resamples, 0)
      print(f'- proxy "{label}" against accuracy ({len(nets)} nets): Kendall tau {interval(tau)}', end='')
      if label == 'fewer layers':
        partial = rank_stats.with_interval_of(
          rank_stats.partial_kendall_tau, (proxy, accuracy, flops), args.resamples, 0
        )
        print(f', partial tau given FLOPs {interval(partial)}', end='')
      print()
    ceiling = seed_to_seed_tau(nets, args.resamples)
    if ceiling:
      print(
        f'- noise ceiling, accuracy under one seed against another ({len(nets)} nets): Kendall tau {interval(ceiling)}'
      )
    print()
  header = '| ratings | search choice | tau of all path scores vs the first |'
  if nets:
    header += f' tau, rating vs accuracy ({len(nets)} nets) | partial tau given FLOPs | partial tau given layers |'
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for row in table:
    choice = row['choice'].replace('|', '\\|')  # a Markdown table cell
    line = f'| {row["name"]} | `{choice}` | {row["tau_vs_first"]:.3f} |'
    if nets and 'tau' in row:
      line += f' {interval(row["tau"])} | {interval(row["partial"])} | {interval(row["partial_layers"])} |'
    elif nets:
      line += ' not in this space | | |'
    print(line)
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
