"""The search stage: WORKDIR/ratings -> the k best nets under the budgets, as files and a Pareto plot.

Writes WORKDIR/search/arch_1.json .. arch_K.json (the architecture, its summed score, FLOPs, params,
MACs and per-block scores) and search/pareto.png (the exact score-cost fronts, the chosen nets and
the published nets that lie in the space). The search itself is `dna_jax.search` (exact, NumPy).
With a latency table (`search.latency_table`, python -m dna_jax.latency) a latency budget
(`search.max_latency_ms`) joins the FLOPs and params budgets, every result carries its predicted
latency, and the plot gains a latency panel.

Standalone, on any ratings directory:
  python -m dna_jax.stages.search --ratings WORKDIR/ratings --max_flops 350M [--max_params 5.3M]
      [--latency_table DIR --max_latency_ms 12.5] [--top_k 5] [--json] [--out DIR] [--overwrite] [--no_plot]
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import time
from typing import Any

from absl import flags
from etils import epath

from dna_jax import cli
from dna_jax import files
from dna_jax import latency_table
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib


def plot_pareto(
  ratings: ratings_lib.Ratings, results: Sequence[search_lib.Result], path_png: str, objective: str = 'sum'
) -> None:
  """Two panels (score vs FLOPs, score vs params): the exact front, the chosen nets and the named nets."""
  plt = files.pyplot()
  named = {}
  for name, arch in space_lib.NAMED_ARCHITECTURES.items():
    rating = ratings_lib.architecture_rating(ratings, arch)
    if rating is not None:
      named[name] = rating
  panels = [('flops', 'FLOPs (M)'), ('params', 'parameters (M)')]
  if ratings.blocks[0].latency is not None:
    panels.append(('latency', 'predicted latency (ms)'))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
  for ax, (cost, label) in zip(axes[0], panels):
    costs, scores = search_lib.pareto_front(ratings, cost)
    ax.step(costs / 1e6, scores, where='post', color='0.3', lw=1, label=f'exact Pareto front ({len(costs):,} points)')
    for rank, r in enumerate(results, 1):
      point = ((r.latency_ms * 1e6 if cost == 'latency' else getattr(r, cost)) / 1e6, r.score)
      ax.plot(*point, 'o', color='tab:red', ms=6, label='chosen' if rank == 1 else None)
      ax.annotate(str(rank), point, textcoords='offset points', xytext=(4, 4), fontsize=7, color='tab:red')
    for name, rating in named.items():
      if cost not in rating:
        continue
      point = (rating[cost] / 1e6, rating['score'])
      ax.plot(*point, 's', color='tab:blue', ms=5)
      ax.annotate(name, point, textcoords='offset points', xytext=(4, -10), fontsize=7, color='tab:blue')
    ax.set_xlabel(label)
    ax.set_ylabel(f'{ratings_lib.OBJECTIVE_LABELS[objective]}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'{ratings.directory or "ratings"}: {ratings.resolution}px, {ratings.num_classes} classes')
  fig.tight_layout()
  files.save_figure(fig, path_png)


def default_out_dir(ratings_dir: str) -> str:
  """WORKDIR/search beside WORKDIR/ratings."""
  if '://' in ratings_dir:
    return os.path.join(os.path.dirname(ratings_dir.rstrip('/')), 'search')
  return os.path.join(os.path.dirname(os.path.abspath(ratings_dir)), 'search')


def run_search(
  ratings_dir: str,
  out_dir: str | None = None,
  max_flops: int | None = None,
  max_params: int | None = None,
  top_k: int = 1,
  overwrite: bool = False,
  plot: bool = True,
  objective: str = 'sum',
  latency_dir: str | None = None,
  max_latency_ms: float | None = None,
) -> list[search_lib.Result]:
  """Reads the ratings, searches, writes `arch_1.json`.. and `pareto.png` into `out_dir`.

  `objective` (ratings.OBJECTIVES) combines the block scores; the results' scores are in its units.
  `latency_dir`: a latency table for the ratings' space, needed by `max_latency_ms`.
  """
  if max_latency_ms is not None and not latency_dir:
    raise ValueError('a latency budget needs a latency table: give --latency_table (search.latency_table)')
  out_dir = out_dir or default_out_dir(ratings_dir)
  names = [f'arch_{i}.json' for i in range(1, top_k + 1)] + (['pareto.png'] if plot else [])
  existing = [n for n in names if (epath.Path(out_dir) / n).exists()]
  if existing and not overwrite:
    raise ValueError(
      f'{out_dir} already holds {", ".join(existing)}; choose another output directory or pass --overwrite'
    )
  ratings = ratings_lib.with_objective(ratings_lib.read_ratings(ratings_dir), objective)
  if latency_dir:
    pruned_on = [c.split(':', 1)[1] for c in ratings.pruned_costs if c.startswith('latency:')]
    if pruned_on and os.path.abspath(pruned_on[0]) != os.path.abspath(latency_dir):
      raise ValueError(
        f'{ratings_dir} were rated adaptively with the latency table {pruned_on[0]}; search with that table, '
        'or rate again with this one (or with --config.rate.adaptive=False)'
      )
    table = latency_table.read(latency_dir)
    latency_table.check_covers(table, ratings.space, ratings.resolution, ratings.num_classes, ratings.stem_stride)
    ratings = latency_table.with_latency(ratings, table)
  results = search_lib.search(ratings, max_flops, max_params, top_k, max_latency_ms)
  for rank, result in enumerate(results, 1):
    record = {
      **result.to_dict(),
      'rank': rank,
      'max_flops': max_flops,
      'max_params': max_params,
      'max_latency_ms': max_latency_ms,
      'latency_table': latency_dir,
      'objective': objective,
      'ratings': ratings_dir if '://' in ratings_dir else os.path.abspath(ratings_dir),
    }
    files.write_json(epath.Path(out_dir) / f'arch_{rank}.json', record)
  if plot:
    plot_pareto(ratings, results, os.path.join(out_dir, 'pareto.png'), objective)
  return results


def run(config: Any, workdir: str) -> dict[str, Any]:
  """The search stage: WORKDIR/ratings -> WORKDIR/search, budgets from `config.search` (0: none)."""
  budget = lambda value: int(value) if value else None
  start = time.perf_counter()
  paths = workdir_lib.Workdir(workdir)
  results = run_search(
    os.fspath(paths.ratings),
    os.fspath(paths.search),
    budget(config.search.max_flops),
    budget(config.search.max_params),
    int(config.search.top_k),
    overwrite=True,
    objective=config.search.objective,
    latency_dir=config.search.latency_table or None,
    max_latency_ms=float(config.search.max_latency_ms) or None,
  )
  best = results[0]
  return {
    'architecture': str(best.architecture),
    'score': round(best.score, 6),
    'flops': best.flops,
    'params': best.params,
    'nets': len(results),
    'seconds': round(time.perf_counter() - start, 2),
  }


def format_table(results: Sequence[search_lib.Result]) -> str:
  timed = results and results[0].latency_ms is not None
  lines = [
    f'{"rank":>4} {"score":>10} {"MFLOPs":>8} {"Mparams":>8} {"MMACs":>8}'
    + ('       ms' if timed else '')
    + '  architecture'
  ]
  for rank, r in enumerate(results, 1):
    latency = f' {r.latency_ms:>8.3f}' if timed else ''
    lines.append(
      f'{rank:>4} {r.score:>10.5f} {r.flops / 1e6:>8.2f} {r.params / 1e6:>8.3f} {r.macs / 1e6:>8.2f}{latency}  '
      f'{r.architecture}'
    )
  return '\n'.join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_string('ratings', None, 'Ratings directory (WORKDIR/ratings).', flag_values=FLAGS)
flags.DEFINE_string('max_flops', None, 'FLOPs budget, e.g. 400M.', flag_values=FLAGS)
flags.DEFINE_string('max_params', None, 'Parameter budget, e.g. 5.3M.', flag_values=FLAGS)
flags.DEFINE_integer('top_k', 1, 'How many nets, best first.', flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print the results as JSON.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/search).', flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'Replace existing arch_*.json / pareto.png.', flag_values=FLAGS)
flags.DEFINE_bool('no_plot', False, 'Skip pareto.png.', flag_values=FLAGS)
flags.DEFINE_string('latency_table', None, 'A latency table directory (python -m dna_jax.latency).', flag_values=FLAGS)
flags.DEFINE_float('max_latency_ms', None, 'Predicted latency budget in ms (needs --latency_table).', flag_values=FLAGS)
flags.DEFINE_enum(
  'objective', 'sum', ratings_lib.OBJECTIVES, 'How block scores combine (ratings.with_objective).', flag_values=FLAGS
)
flags.mark_flag_as_required('ratings', flag_values=FLAGS)


def main(argv: list[str]) -> int:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  budget = lambda text: None if text is None else cli.count(text)
  start = time.perf_counter()
  results = run_search(
    FLAGS.ratings,
    FLAGS.out,
    budget(FLAGS.max_flops),
    budget(FLAGS.max_params),
    FLAGS.top_k,
    FLAGS.overwrite,
    plot=not FLAGS.no_plot,
    objective=FLAGS.objective,
    latency_dir=FLAGS.latency_table,
    max_latency_ms=FLAGS.max_latency_ms,
  )
  if FLAGS.json:
    print(json.dumps([{**r.to_dict(), 'rank': i} for i, r in enumerate(results, 1)], indent=1))
  else:
    print(format_table(results))
    out = FLAGS.out or default_out_dir(FLAGS.ratings)
    print(f'({len(results)} nets, {time.perf_counter() - start:.2f} s; files in {out})')
  return 0


if __name__ == '__main__':
  cli.run(main, FLAGS)
