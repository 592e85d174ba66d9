"""What bfloat16 does to the ranking: every path rated in float32 and in bfloat16, same weights, same images.

  PYTHONPATH=. python benchmarks/precision_ranking.py --workdir /tmp/dna_demo [--objective sum]

Takes a distilled workdir (teacher/ and distill/, e.g. the demo's), rates every path of every block
twice with the run's config (WORKDIR/config.json), once with config.model.dtype float32 and once with
bfloat16 (student activations; parameters and the teacher stay float32), in two scratch workdirs, and
prints per block: Kendall tau between the two score vectors, the largest relative score change and
whether the block's best path changes; then the search's choice under the run's budgets in both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dna_jax import config_base
from dna_jax import host_memory
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import search as search_lib
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib
from dna_jax.stages import rate


def rate_copy(config, source: workdir_lib.Workdir, target_dir: str) -> tuple[ratings_lib.Ratings, float]:
  """Rates a copy of `source`'s teacher and distilled blocks in `target_dir` with `config`: (ratings, seconds)."""
  target = workdir_lib.Workdir(target_dir)
  for name in ('teacher', 'distill'):
    shutil.copytree(source.root / name, target.root / name)
  start = time.perf_counter()
  rate.run(config, str(target))
  return ratings_lib.read_ratings(str(target.ratings)), time.perf_counter() - start


def rate_with(config, source: workdir_lib.Workdir, scratch: str, dtype: str) -> tuple[ratings_lib.Ratings, float]:
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  return rate_copy(config, source, os.path.join(scratch, dtype))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--objective', default='sum', choices=ratings_lib.OBJECTIVES)
  args = parser.parse_args()
  source = workdir_lib.Workdir(args.workdir)
  config = config_base.saved_config(args.workdir)
  with tempfile.TemporaryDirectory() as scratch:
    (f32, f32_s), (bf16, bf16_s) = (rate_with(config, source, scratch, d) for d in ('float32', 'bfloat16'))
  print(f'rating time: float32 {f32_s:.0f} s, bfloat16 {bf16_s:.0f} s (this CPU emulates bfloat16)')
  print('| block | paths | Kendall tau f32 vs bf16 | largest relative change | best path f32 | best path bf16 |')
  print('|---|---|---|---|---|---|')
  all_a, all_b = [], []
  for k, (a, b) in enumerate(zip(f32.blocks, bf16.blocks)):
    once = a.each_path_once
    sa, sb = a.score[once], b.score[once]
    all_a.append(sa)
    all_b.append(sb)
    tau = float(rank_stats.kendall_tau(sa, sb)) if len(sa) > 1 else float('nan')
    change = float(np.max(np.abs(sb - sa) / np.abs(sa)))
    rows = np.flatnonzero(once)
    best_a = space_lib.ops_string(a.ops[rows[int(np.argmin(sa))]])
    best_b = space_lib.ops_string(b.ops[rows[int(np.argmin(sb))]])
    print(f'| {k + 1} | {len(sa)} | {tau:.4f} | {change:.2e} | {best_a} | {best_b} |')
  tau_all = float(rank_stats.kendall_tau(np.concatenate(all_a), np.concatenate(all_b)))
  print(f'| all | {sum(map(len, all_a))} | {tau_all:.4f} | | | |')
  budgets = [int(v) if v else None for v in (config.search.max_flops, config.search.max_params)]
  for name, table in (('float32', f32), ('bfloat16', bf16)):
    results = search_lib.search(ratings_lib.with_objective(table, args.objective), *budgets, top_k=5)
    print(f'{name}: search top-5 ({args.objective}):', ', '.join(str(r.architecture) for r in results))


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  main()
