"""Adaptive against exhaustive rating on a distilled workdir: answers, times, paths kept against the fewest.

  PYTHONPATH=. python benchmarks/adaptive_rating.py --workdir /tmp/dna_demo [--batch_size 250]
      [--adaptive_examples 250] [--rating_examples 0] [--top_k 5] [--chunk_size 0]

Takes a distilled workdir (teacher/ and distill/, e.g. the demo's) and rates every block with the run's
config (WORKDIR/config.json) in scratch workdirs, at the same batch size: first one batch, untimed, which
compiles the programs both timed ratings share; then exhaustively (rate.adaptive=False) and adaptively
(the first --adaptive_examples images for every path, then only the paths that can still be in the top
k). Prints the rating time of each (same run, same machine; adaptive rating's own sparse calls compile
within its time), the share of the path-images adaptive rating rated, and whether the search's top k at
three FLOPs budgets (a quarter, half and three quarters of the way from the space's cheapest to its
dearest net) and a params budget (half way), and the FLOPs and params Pareto fronts, are the same. Per
block it prints the paths adaptive rating kept against the fewest any pruning by its rule could keep:
the paths that fewer than rate.keep others beat on the exhaustive scores at no higher cost (the rule with
the whole split's errors and no statistical margin). --rating_examples rates more (or fewer) images than
the run did (the first images of the training split: past the run's own rating split, images the
supernet may have been distilled on).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import precision_ranking
from dna_jax import config_base
from dna_jax import host_memory
from dna_jax import latency_table
from dna_jax import path_pruning
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib


def rate_with(
  config, source: workdir_lib.Workdir, scratch: str, name: str, adaptive: bool, images: int = 0
) -> tuple[ratings_lib.Ratings, float]:
  """Rates a copy of `source` in scratch/name (`images` > 0: only that many rating images): (ratings, s)."""
  config = config.copy_and_resolve_references()
  config.rate.adaptive = adaptive
  config.data.rating_examples = images or config.data.rating_examples
  return precision_ranking.rate_copy(config, source, os.path.join(scratch, name))


def fewest_kept(config, table: ratings_lib.Ratings, keep: int) -> list[int]:
  """Per block, the paths that fewer than `keep` others of the same output width beat on `table`'s
  (exhaustive) scores at no higher cost: path_pruning's rule with those scores for errors and no margin."""
  space = space_lib.space_from_config(config.space)
  latency = latency_table.read(config.search.latency_table) if config.search.latency_table else None
  out = []
  for k, block in enumerate(table.blocks):
    cell_costs = path_pruning.block_path_costs(space, k, config.data.image_size, config.space.stem_stride, latency)
    score = block.score[block.each_path_once]  # cell-major, path order: as the costs
    scores = np.split(score, np.cumsum([len(c) for c in cell_costs])[:-1])
    widths = [cell.width for cell in space.blocks[k].cells]
    # two equal groups: the paired difference's standard error is 0, so z = 0 asks only for a lower score
    kept = path_pruning.prune_block(cell_costs, [np.stack([s, s], 1) for s in scores], widths, keep, z=0.0)
    out.append(int(sum(int(x.sum()) for x in kept)))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batch_size', type=int, default=250)
  parser.add_argument('--adaptive_examples', type=int, default=250)
  parser.add_argument('--rating_examples', type=int, default=0, help="images to rate (0: the run's config)")
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--chunk_size', type=int, default=0, help="paths per vmapped call (0: the run's config)")
  args = parser.parse_args()
  source = workdir_lib.Workdir(args.workdir)
  config = config_base.saved_config(args.workdir)
  config.rate.batch_size = args.batch_size
  config.rate.adaptive_examples = args.adaptive_examples
  config.rate.keep = max(config.rate.keep, args.top_k)
  config.rate.chunk_size = args.chunk_size or config.rate.chunk_size
  config.data.rating_examples = args.rating_examples or config.data.rating_examples
  with tempfile.TemporaryDirectory() as scratch:
    # One batch first, untimed: it compiles the programs both ratings share (each cell's calibration and
    # rating calls at this batch size), which this process then keeps. Without it the exhaustive rating,
    # run first, paid every compile and the adaptive one none: on the demo workdir 45 against 22 s, where
    # like for like it is 18 against 21 s (README).
    _, warm_s = rate_with(config, source, scratch, 'warm-up', adaptive=False, images=args.batch_size)
    exhaustive, ex_s = rate_with(config, source, scratch, 'exhaustive', adaptive=False)
    adaptive, ad_s = rate_with(config, source, scratch, 'adaptive', adaptive=True)
  rated = sum(int(b.images[b.each_path_once].sum()) for b in adaptive.blocks)
  total = sum(int(b.images.max()) * int(b.each_path_once.sum()) for b in adaptive.blocks)
  print(
    f'rating time, {config.data.rating_examples} images in batches of {args.batch_size}, chunk '
    f'{config.rate.chunk_size}, after a one-batch warm-up ({warm_s:.0f} s, compiling): exhaustive {ex_s:.0f} s, '
    f'adaptive {ad_s:.0f} s ({ex_s / ad_s:.2f}x; its sparse calls compiled within), {100 * rated / total:.1f}% of '
    f'the path-images; load average {os.getloadavg()[0]:.1f}'
  )
  for k, (block, fewest) in enumerate(zip(adaptive.blocks, fewest_kept(config, exhaustive, config.rate.keep))):
    once = block.each_path_once
    print(
      f'block {k + 1}: {int(block.pruned[once].sum())} of {int(once.sum())} paths stopped after '
      f'{args.adaptive_examples} images; {int((~block.pruned[once]).sum())} kept, against {fewest} with fewer '
      f'than {config.rate.keep} cheaper paths scoring lower on the exhaustive ratings'
    )
  low, high = search_lib.pareto_front(exhaustive)[0][[0, -1]]
  params = search_lib.pareto_front(exhaustive, 'params')[0]
  budgets = [(int(low + f * (high - low)), None) for f in (0.25, 0.5, 0.75)] + [(None, int(np.median(params)))]
  same = True
  for max_flops, max_params in budgets:
    answers = [
      [str(r.architecture) for r in search_lib.search(t, max_flops, max_params, args.top_k)]
      for t in (exhaustive, adaptive)
    ]
    same &= answers[0] == answers[1]
    print(
      f'top {args.top_k} at max_flops={max_flops} max_params={max_params}: '
      f'{"same" if answers[0] == answers[1] else "DIFFERENT"} ({answers[0][0]} first)'
    )
  for cost in ('flops', 'params'):
    fronts = [search_lib.pareto_front(t, cost) for t in (exhaustive, adaptive)]
    equal = np.array_equal(fronts[0][0], fronts[1][0]) and np.allclose(fronts[0][1], fronts[1][1], rtol=1e-5)
    same &= equal
    print(f'{cost} Pareto front ({len(fronts[0][0])} points): {"same" if equal else "DIFFERENT"}')
  print('adaptive rating gives the exhaustive answer' if same else 'ANSWERS DIFFER')


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  main()
