"""Speed of the exact search on the full default ImageNet space (about 1.7e17 architectures).

Writes synthetic ratings for every path of `default_imagenet_space()` with `write_block_ratings`
(into a temporary directory, or --ratings DIR to keep them), then times `search` for FLOPs,
params and joint budgets, top_k 1 and 10, on one thread.

  python benchmarks/search_speed.py                      # uniform random scores
  python benchmarks/search_speed.py --scores correlated  # score falls with block FLOPs, plus noise
"""

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_var, '1')  # one core, as the numbers below claim

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dna_jax import costs
from dna_jax import host_memory
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib

BUDGETS = [(400e6, None), (None, 5.3e6), (400e6, 5.3e6), (300e6, None), (None, 4.0e6), (300e6, 4.0e6)]


def write_scores(directory: str, kind: str, noise: float, seed: int) -> None:
  space = space_lib.default_imagenet_space()
  rng = np.random.default_rng(seed)
  sizes = space_lib.block_sizes(space, 224)
  for k, block in enumerate(space.blocks):
    scores = {}
    for c, cell in enumerate(block.cells):
      if kind == 'random':
        scores[c] = rng.random(cell.num_paths)
      else:
        width = space_lib.block_input_widths(space, k)[0]
        flops = np.array([costs.cell_cost(cell, ops, width, sizes[k]).flops for ops in cell.paths()], float)
        scores[c] = 1.0 - 0.3 * np.log(flops / 1e7) + noise * rng.standard_normal(cell.num_paths)
    ratings_lib.write_block_ratings(directory, space, k, scores, scores, resolution=224, num_classes=1000)


def timed(fn, repeats: int):
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scores', choices=('random', 'correlated'), default='random')
  parser.add_argument('--noise', type=float, default=0.02, help='noise std of --scores correlated')
  parser.add_argument('--ratings', default=None, help='keep the ratings here (reused if complete)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    directory = args.ratings or os.path.join(tmp, 'ratings')
    if not all(ratings_lib.block_complete(directory, k) for k in range(6)):
      start = time.perf_counter()
      write_scores(directory, args.scores, args.noise, args.seed)
      print(f'wrote ratings in {time.perf_counter() - start:.1f} s')
    seconds, ratings = timed(lambda: ratings_lib.read_ratings(directory), 1)
    print(
      f'space: {ratings.space.num_architectures:.3g} architectures, '
      f'{sum(len(b) for b in ratings.blocks):,} rating rows; read in {seconds:.2f} s'
    )
    for cost in ('flops', 'params'):
      seconds, (front, _) = timed(lambda cost=cost: search_lib.pareto_front(ratings, cost), 1)
      print(f'pareto_front({cost}): {len(front):,} points in {seconds:.3f} s')
    print(f'\nscores: {args.scores}; median of {args.repeats} runs')
    print(
      f'{"max_flops":>10} {"max_params":>10} {"top_k":>5} {"seconds":>8}  {"best score":>10} {"MFLOPs":>7} '
      f'{"Mparams":>7}  {"k-th score":>10}'
    )
    for max_flops, max_params in BUDGETS:
      for top_k in (1, 10):
        budget = (None if max_flops is None else int(max_flops), None if max_params is None else int(max_params))
        seconds, results = timed(lambda b=budget, k=top_k: search_lib.search(ratings, *b, k), args.repeats)
        best = results[0]
        print(
          f'{_m(max_flops):>10} {_m(max_params):>10} {top_k:>5} {seconds:>8.3f}  {best.score:>10.5f} '
          f'{best.flops / 1e6:>7.1f} {best.params / 1e6:>7.3f}  {results[-1].score:>10.5f}'
        )


def _m(value) -> str:
  return '-' if value is None else f'{value / 1e6:g}M'


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  main()
