"""Exact constrained search: the k nets with the lowest summed block score under FLOPs/params budgets.

Problem: pick one rated (cell, path) per block, minimising the sum of block scores subject to
total FLOPs <= max_flops and total params <= max_params (fixed stem/DS/head cost included).
Block costs are additive given the previous block's width (a block's first layer reads it), so
the width of the previous block is the only state passed between blocks.

Algorithm (exact, not a heuristic):
1. Per block and per (input width, output width), candidates with identical (flops, params)
   keep their k best; then every candidate dominated by >= k others of its group (no worse in
   score, flops and params, better in the ranking order below) is dropped: each net using it
   would have k strictly better feasible nets, so it cannot be among the top k.
2. Lower bounds on the best score of the remaining blocks, per input width, from knapsack tables
   over budget buckets: costs are rounded down onto a grid (4096 buckets per budget, 64x64 for
   both), which relaxes the budgets, so the tables never overestimate.
3. A* over blocks (best first, lazily generating siblings in sorted order): a node's priority
   is (score + bound, flops + cheapest rest, params + cheapest rest, choices so far), which never
   exceeds that of any completion, so complete nets come out exactly in ranking order.

Ranking order (deterministic tie-breaking): summed score, then total FLOPs, then total params,
then the choices block by block, each as (cell index, path index in `Cell.paths()` order).
Scores are compared on a fixed-point grid of 2^-e (e chosen so the largest possible sum stays
below 2^53, about 1e-15 relative), so sums are exact whatever the order of addition and equal
scores tie exactly. Reported scores are the plain float sums in block order.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib

GRID = 4096        # buckets per budget of the 1-D bound tables
GRID_2D = 64       # buckets per budget of the joint table, used when both budgets are set
_CHUNK = 1 << 21   # elements per temporary array in pairwise steps


@dataclasses.dataclass(frozen=True)
class Result:
  """One chosen net: totals include the fixed stem/DS/head cost."""
  architecture: space_lib.Architecture
  score: float
  flops: int
  params: int
  macs: int
  choices: tuple[tuple[int, tuple[int, ...]], ...]  # (cell index, ops) per block
  block_scores: tuple[float, ...]
  rows: tuple[int, ...]                             # row of each block in `Ratings.blocks[k]`

  def to_dict(self) -> dict[str, Any]:
    return {**self.architecture.to_dict(), 'score': self.score, 'flops': self.flops, 'params': self.params,
            'macs': self.macs, 'block_scores': list(self.block_scores)}


@dataclasses.dataclass(frozen=True)
class _Candidates:
  """Rows of one block for one input width, after pruning."""
  score: np.ndarray  # float64 holding fixed-point integers
  flops: np.ndarray
  params: np.ndarray
  nxt: np.ndarray    # index of the output width in the next position's width list
  cell: np.ndarray
  path: np.ndarray
  row: np.ndarray

  @property
  def groups(self) -> list[tuple[int, np.ndarray]]:
    """(output width index, positions) of each output width present."""
    return [(int(o), np.flatnonzero(self.nxt == o)) for o in np.unique(self.nxt)]


def _score_scale(ratings: ratings_lib.Ratings) -> float:
  """Power of two that turns scores into integers whose sums stay exact in float64."""
  largest = max(float(np.abs(b.score).max()) for b in ratings.blocks) * len(ratings.blocks)
  return 1.0 if largest == 0 else 2.0 ** (52 - math.ceil(math.log2(largest)))


def _widths(space: space_lib.SearchSpace) -> list[list[int]]:
  """Input widths of every position 0..N; position N holds the last block's widths."""
  widths = [ratings_lib.input_widths(space, m) for m in range(len(space.blocks))]
  return widths + [sorted({c.width for c in space.blocks[-1].cells})]


def _dominance_keep(score, flops, params, cell, path, top_k: int) -> np.ndarray:
  """Indices of the rows of one group that are dominated by fewer than `top_k` others."""
  order = np.lexsort((path, cell, score, params, flops))
  f, p, s = flops[order], params[order], score[order]
  new = np.r_[True, (f[1:] != f[:-1]) | (p[1:] != p[:-1])]
  cls = np.cumsum(new) - 1
  start = np.flatnonzero(new)
  rank = np.arange(len(order)) - start[cls]
  keep = rank < top_k
  order, cls, rank, s = order[keep], cls[keep], rank[keep], s[keep]
  num = len(start)
  table = np.full((num, top_k), np.inf)
  table[cls, rank] = s
  cf, cp = f[start], p[start]
  kth = np.empty((num, top_k))
  step = max(1, _CHUNK // (num * top_k))
  for lo in range(0, num, step):
    hi = min(num, lo + step)
    dom = (cf[None, :] <= cf[lo:hi, None]) & (cp[None, :] <= cp[lo:hi, None])
    dom[np.arange(hi - lo), np.arange(lo, hi)] = False
    values = np.where(dom[:, :, None], table[None], np.inf).reshape(hi - lo, num * top_k)
    part = np.partition(values, top_k - 1, axis=1)[:, :top_k]
    kth[lo:hi] = np.sort(part, axis=1)
  # a row of rank r is dominated by r rows of its class and by every row of a cheaper class
  # with a score no higher; it goes when those reach top_k.
  dominated = kth[cls, top_k - 1 - rank] <= s
  return order[~dominated]


def _candidates(ratings: ratings_lib.Ratings, scale: float, top_k: int) -> list[dict[int, _Candidates]]:
  widths = _widths(ratings.space)
  out = []
  for m, (block, table) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    cell_width = np.array([c.width for c in block.cells])[table.cell]
    score = np.rint(table.score * scale)
    per_width = {}
    for w_in in widths[m]:
      kept = []
      for w_out in widths[m + 1]:
        rows = np.flatnonzero((table.in_channels == w_in) & (cell_width == w_out))
        if len(rows):
          kept.append(rows[_dominance_keep(score[rows], table.flops[rows], table.params[rows],
                                           table.cell[rows], table.path[rows], top_k)])
      rows = np.sort(np.concatenate(kept))
      per_width[w_in] = _Candidates(score[rows], table.flops[rows], table.params[rows],
                                    np.searchsorted(widths[m + 1], cell_width[rows]), table.cell[rows],
                                    table.path[rows], rows)
    out.append(per_width)
  return out


def _suffix_min(cands: list[dict[int, _Candidates]], widths: list[list[int]], field: str) -> list[np.ndarray]:
  """Per position m and input width: the smallest sum of `field` over blocks m..N-1."""
  best = [np.zeros(len(widths[-1]))]
  for m in range(len(cands) - 1, -1, -1):
    nxt = best[0]
    best.insert(0, np.array([(getattr(c, field) + nxt[c.nxt]).min() for c in cands[m].values()], dtype=np.float64))
  return best


def _prefix_min(cands: list[dict[int, _Candidates]], widths: list[list[int]], field: str) -> list[dict[int, int]]:
  """Per position m and input width: the smallest sum of `field` over blocks 0..m-1 reaching it."""
  best = [{widths[0][0]: 0}]
  for m, per_width in enumerate(cands):
    reach: dict[int, int] = {}
    for w_in, c in per_width.items():
      if w_in not in best[-1]:
        continue
      for o, at in c.groups:
        value = best[-1][w_in] + int(getattr(c, field)[at].min())
        w = widths[m + 1][o]
        reach[w] = min(reach.get(w, value), value)
    best.append(reach)
  return best


def _skyline(cost: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Points not dominated in (cost, score): increasing cost, strictly decreasing score."""
  order = np.argsort(cost, kind='stable')
  cost, score = cost[order], score[order]
  starts = np.flatnonzero(np.r_[True, cost[1:] != cost[:-1]])
  cost, score = cost[starts], np.minimum.reduceat(score, starts)
  keep = score < np.r_[np.inf, np.minimum.accumulate(score)[:-1]]
  return cost[keep], score[keep]


def _merge(fronts: dict[int, tuple], groups: Sequence[tuple], limit: dict[int, int] | None = None) -> dict[int, tuple]:
  """Fronts one block further: `fronts[w]` reaches width w; `groups` are (w_from, w_to, cost, score)
  fronts of the block's rows. Sums are exact; `limit[w_to]` drops costs above it."""
  parts: dict[int, list] = {}
  for w_from, w_to, cost, score in groups:
    if w_from not in fronts or (limit is not None and w_to not in limit):
      continue
    acc_cost, acc_score = fronts[w_from]
    if limit is not None:
      n = np.searchsorted(acc_cost, limit[w_to] - cost[0], 'right')
      acc_cost, acc_score = acc_cost[:n], acc_score[:n]
    step = max(1, _CHUNK // len(cost))
    for lo in range(0, len(acc_cost), step):
      sum_cost = (acc_cost[lo:lo + step, None] + cost[None]).ravel()
      sum_score = (acc_score[lo:lo + step, None] + score[None]).ravel()
      if limit is not None:
        keep = sum_cost <= limit[w_to]
        sum_cost, sum_score = sum_cost[keep], sum_score[keep]
      if len(sum_cost):
        parts.setdefault(w_to, []).append(_skyline(sum_cost, sum_score))
  return {w: _skyline(np.concatenate([c for c, _ in p]), np.concatenate([s for _, s in p]))
          for w, p in parts.items()}


def _suffix_fronts(cands: list[dict[int, _Candidates]], widths: list[list[int]], field: str,
                   budget: int) -> list[dict[int, tuple]]:
  """fronts[m][w] (m >= 1): exact (cost, best score) staircase of blocks m..N-1 entered at width w,
  costs limited to what `budget` (fixed part excluded) leaves after the cheapest way to reach m."""
  reach = _prefix_min(cands, widths, field)
  fronts = [{w: (np.zeros(1, np.int64), np.zeros(1)) for w in widths[-1]}]
  for m in range(len(cands) - 1, 0, -1):  # position 0 is never queried
    groups = []
    for w_in, c in cands[m].items():
      values = getattr(c, field)
      for o, at in c.groups:
        groups.append((widths[m + 1][o], w_in, *_skyline(values[at], c.score[at])))
    limit = {w: budget - reach[m][w] for w in widths[m] if w in reach[m]}
    fronts.insert(0, _merge(fronts[0], groups, limit))
  return [{}] + fronts


def _front_bound(front: dict[int, tuple], widths: list[int], groups: list[tuple[int, np.ndarray]],
                 left: np.ndarray) -> np.ndarray:
  """Best score of the rest entered at width widths[o] with at most `left` cost; inf if none."""
  bound = np.full(len(left), np.inf)
  for o, at in groups:
    if widths[o] not in front:
      continue
    cost, score = front[widths[o]]
    index = np.searchsorted(cost, left[at], 'right') - 1
    bound[at] = np.where(index >= 0, score[np.maximum(index, 0)], np.inf)
  return bound


def _bucket(values: np.ndarray, slack: int, grid: int) -> np.ndarray:
  """Cost above the block minimum in grid units, rounded down (budgets rounded down too: a relaxation)."""
  return np.minimum(values * grid // max(slack, 1), grid + 1)


def _joint_table(cands: list[dict[int, _Candidates]], widths: list[list[int]], budgets: Sequence[int], grid: int):
  """tables[m][w, bf, bp]: lowest score of blocks m.. whose bucketed FLOPs and params sum to at most (bf, bp)."""
  fields = ('flops', 'params')
  lows = [[min(int(getattr(c, f).min()) for c in cands_m.values()) for f in fields] for cands_m in cands]
  slack = [budget - sum(low[i] for low in lows) for i, budget in enumerate(budgets)]
  tables = [np.zeros((len(widths[-1]), grid + 1, grid + 1))]
  for m in range(len(cands) - 1, -1, -1):
    nxt = tables[0]
    table = np.full((len(widths[m]), grid + 1, grid + 1), np.inf)
    for wi, c in enumerate(cands[m].values()):
      bf, bp = (_bucket(getattr(c, f) - lows[m][i], slack[i], grid) for i, f in enumerate(fields))
      fits = (bf <= grid) & (bp <= grid)
      # one item per (output width, buckets): the lowest score
      items, inverse = np.unique(np.stack([c.nxt[fits], bf[fits], bp[fits]]), axis=1, return_inverse=True)
      scores = np.full(items.shape[1], np.inf)
      np.minimum.at(scores, inverse.reshape(-1), c.score[fits])
      for (o, f, p), s in zip(items.T, scores):
        target = table[wi, f:, p:]
        np.minimum(target, nxt[o, :grid + 1 - f, :grid + 1 - p] + s, out=target)
    tables.insert(0, table)
  rest_low = [np.r_[np.cumsum([low[i] for low in lows][::-1])[::-1], 0] for i in range(2)]
  return tables, slack, rest_low


def _raw_minimum(ratings: ratings_lib.Ratings, field: str) -> int:
  """Smallest total of `field` over the whole space, fixed part included."""
  widths = _widths(ratings.space)
  best = {w: 0 for w in widths[0]}
  for m, (block, table) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    cell_width = np.array([c.width for c in block.cells])[table.cell]
    values = getattr(table, field)
    best = {w_out: min(best[w_in] + int(values[(table.in_channels == w_in) & (cell_width == w_out)].min())
                       for w_in in widths[m] if np.any((table.in_channels == w_in) & (cell_width == w_out)))
            for w_out in widths[m + 1]}
  return min(best.values()) + getattr(ratings, f'fixed_{field}')


def _check_budget(ratings: ratings_lib.Ratings, budget: int | None, field: str, name: str) -> None:
  if budget is None:
    return
  lowest = _raw_minimum(ratings, field)
  if budget < lowest:
    label = 'FLOPs' if field == 'flops' else 'params'
    raise ValueError(f'{name}={budget:,} is below the cheapest architecture of the space: the minimum '
                     f'achievable {label} is {lowest:,} ({lowest / 1e6:.2f}M)')


def search(ratings: ratings_lib.Ratings, max_flops: int | None = None, max_params: int | None = None,
           top_k: int = 1) -> list[Result]:
  """The `top_k` nets of lowest summed score within the budgets, best first (exact; see module doc)."""
  if top_k < 1:
    raise ValueError(f'top_k must be >= 1, got {top_k}')
  _check_budget(ratings, max_flops, 'flops', 'max_flops')
  _check_budget(ratings, max_params, 'params', 'max_params')
  scale = _score_scale(ratings)
  cands = _candidates(ratings, scale, top_k)
  widths = _widths(ratings.space)
  n = len(cands)
  min_score = _suffix_min(cands, widths, 'score')
  min_flops = _suffix_min(cands, widths, 'flops')
  min_params = _suffix_min(cands, widths, 'params')
  fixed_f, fixed_p = ratings.fixed_flops, ratings.fixed_params
  budgets = {'flops': None if max_flops is None else max_flops - fixed_f,
             'params': None if max_params is None else max_params - fixed_p}
  active = [f for f in ('flops', 'params') if budgets[f] is not None]
  fronts = {f: _suffix_fronts(cands, widths, f, budgets[f]) for f in active}
  joint = _joint_table(cands, widths, [budgets[f] for f in active], GRID_2D) if len(active) == 2 else None

  groups = [[c.groups for c in per_width.values()] for per_width in cands]

  def expand(m: int, s: float, f: int, p: int, wi: int):
    c = cands[m][widths[m][wi]]
    s2, f2, p2 = s + c.score, f + c.flops, p + c.params
    lb_f = f2 + min_flops[m + 1][c.nxt]
    lb_p = p2 + min_params[m + 1][c.nxt]
    lb_s = s2 + min_score[m + 1][c.nxt]
    left = {'flops': budgets['flops'] - (f2 - fixed_f) if max_flops is not None else None,
            'params': budgets['params'] - (p2 - fixed_p) if max_params is not None else None}
    for field in active:
      lb_s = np.maximum(lb_s, s2 + _front_bound(fronts[field][m + 1], widths[m + 1], groups[m][wi], left[field]))
    if joint is not None:
      tables, slack, rest_low = joint
      index = [c.nxt]
      for i, field in enumerate(active):
        rest = left[field] - rest_low[i][m + 1]
        index.append(np.clip(rest * GRID_2D // max(slack[i], 1), 0, GRID_2D))
        lb_s = np.where(rest < 0, np.inf, lb_s)
      lb_s = np.maximum(lb_s, s2 + tables[m + 1][tuple(index)])
    ok = np.isfinite(lb_s)
    keep = np.flatnonzero(ok)
    order = keep[np.lexsort((c.path[keep], c.cell[keep], lb_p[keep], lb_f[keep], lb_s[keep]))]
    return (lb_s[order], lb_f[order], lb_p[order], s2[order], f2[order], p2[order], c.nxt[order],
            c.cell[order], c.path[order], c.row[order])

  # heap entries: (score bound, flops bound, params bound, choices key, expansion id, position)
  expansions = []
  parents = []  # per expansion: (depth of its children, rows chosen before them)
  heap = []

  def push(e: int, i: int, key: tuple[int, ...]) -> None:
    lb_s, lb_f, lb_p, *_, cell, path, _ = expansions[e]
    heapq.heappush(heap, (lb_s[i].item(), lb_f[i].item(), lb_p[i].item(), key + (cell[i].item(), path[i].item()),
                          e, i))

  def push_expansion(m, s, f, p, wi, key, rows):
    children = expand(m, s, f, p, wi)
    if len(children[0]):
      expansions.append(children)
      parents.append((m, rows))
      push(len(expansions) - 1, 0, key)

  push_expansion(0, 0.0, fixed_f, fixed_p, 0, (), ())
  found = []
  while heap and len(found) < top_k:
    _, _, _, key, e, i = heapq.heappop(heap)
    children = expansions[e]
    m, rows = parents[e]
    if i + 1 < len(children[0]):
      push(e, i + 1, key[:-2])
    chosen = rows + (int(children[9][i]),)
    if m == n - 1:
      found.append(chosen)
    else:
      push_expansion(m + 1, children[3][i], children[4][i], children[5][i], int(children[6][i]), key, chosen)
  if not found:
    raise ValueError(f'no architecture of the space meets both max_flops={max_flops:,} and '
                     f'max_params={max_params:,} (each alone is achievable: minimum FLOPs '
                     f'{_raw_minimum(ratings, "flops"):,}, minimum params {_raw_minimum(ratings, "params"):,})')
  return [_result(ratings, rows) for rows in found]


def _result(ratings: ratings_lib.Ratings, rows: Sequence[int]) -> Result:
  choices = tuple((int(b.cell[r]), b.ops[r]) for b, r in zip(ratings.blocks, rows))
  arch = space_lib.make_architecture(ratings.space, choices)
  block_scores = tuple(float(b.score[r]) for b, r in zip(ratings.blocks, rows))
  total = lambda field: getattr(ratings, f'fixed_{field}') + sum(int(getattr(b, field)[r])
                                                                for b, r in zip(ratings.blocks, rows))
  return Result(arch, float(sum(block_scores)), total('flops'), total('params'), total('macs'), choices,
                block_scores, tuple(int(r) for r in rows))


# ----------------------------------------------------------------------------- Pareto front


def pareto_front(ratings: ratings_lib.Ratings, cost: str = 'flops') -> tuple[np.ndarray, np.ndarray]:
  """Exact front of summed score against total `cost` ('flops' or 'params') over the whole space.

  Returns (costs, scores): every total cost at which the best achievable score improves, costs
  increasing (fixed part included), scores strictly decreasing.
  """
  if cost not in ('flops', 'params'):
    raise ValueError(f"cost must be 'flops' or 'params', got {cost!r}")
  scale = _score_scale(ratings)
  widths = _widths(ratings.space)
  cands = _candidates(ratings, scale, 1)  # keeps every (cost, score) value of each group's front
  front = {widths[0][0]: (np.array([getattr(ratings, f'fixed_{cost}')], np.int64), np.zeros(1))}
  for m, per_width in enumerate(cands):
    groups = []
    for w_in, c in per_width.items():
      for o, at in c.groups:
        groups.append((w_in, widths[m + 1][o], *_skyline(getattr(c, cost)[at], c.score[at])))
    front = _merge(front, groups)
  costs, scores = _skyline(np.concatenate([c for c, _ in front.values()]),
                           np.concatenate([s for _, s in front.values()]))
  return costs, scores / scale


# ----------------------------------------------------------------------------- plot, files, CLI


def plot_pareto(ratings: ratings_lib.Ratings, results: Sequence[Result], path_png: str) -> None:
  """Two panels (score vs FLOPs, score vs params): the exact front, the chosen nets and the named nets."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  named = {}
  for name, arch in space_lib.NAMED_ARCHITECTURES.items():
    rating = ratings_lib.architecture_rating(ratings, arch)
    if rating is not None:
      named[name] = rating
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  for ax, cost, label in ((axes[0], 'flops', 'FLOPs (M)'), (axes[1], 'params', 'parameters (M)')):
    costs, scores = pareto_front(ratings, cost)
    ax.step(costs / 1e6, scores, where='post', color='0.3', lw=1, label=f'exact Pareto front ({len(costs):,} points)')
    for rank, r in enumerate(results, 1):
      ax.plot(getattr(r, cost) / 1e6, r.score, 'o', color='tab:red', ms=6, label='chosen' if rank == 1 else None)
      ax.annotate(str(rank), (getattr(r, cost) / 1e6, r.score), textcoords='offset points', xytext=(4, 4),
                  fontsize=7, color='tab:red')
    for name, rating in named.items():
      ax.plot(rating[cost] / 1e6, rating['score'], 's', color='tab:blue', ms=5)
      ax.annotate(name, (rating[cost] / 1e6, rating['score']), textcoords='offset points', xytext=(4, -10),
                  fontsize=7, color='tab:blue')
    ax.set_xlabel(label)
    ax.set_ylabel('summed block score (relative L1)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'{ratings.directory or "ratings"}: {ratings.resolution}px, {ratings.num_classes} classes')
  fig.tight_layout()
  fig.savefig(path_png, dpi=120)
  plt.close(fig)


def default_out_dir(ratings_dir: str) -> str:
  """WORKDIR/search beside WORKDIR/ratings."""
  return os.path.join(os.path.dirname(os.path.abspath(ratings_dir)), 'search')


def run_search(ratings_dir: str, out_dir: str | None = None, max_flops: int | None = None,
               max_params: int | None = None, top_k: int = 1, overwrite: bool = False,
               plot: bool = True) -> list[Result]:
  """Reads the ratings, searches, writes `arch_1.json`.. and `pareto.png` into `out_dir`."""
  out_dir = out_dir or default_out_dir(ratings_dir)
  names = [f'arch_{i}.json' for i in range(1, top_k + 1)] + (['pareto.png'] if plot else [])
  existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
  if existing and not overwrite:
    raise ValueError(f'{out_dir} already holds {", ".join(existing)}; choose another output directory '
                     'or pass --overwrite')
  ratings = ratings_lib.read_ratings(ratings_dir)
  results = search(ratings, max_flops, max_params, top_k)
  os.makedirs(out_dir, exist_ok=True)
  for rank, result in enumerate(results, 1):
    record = {**result.to_dict(), 'rank': rank, 'max_flops': max_flops, 'max_params': max_params,
              'ratings': os.path.abspath(ratings_dir)}
    with open(os.path.join(out_dir, f'arch_{rank}.json'), 'w') as f:
      f.write(json.dumps(record, indent=1) + '\n')
  if plot:
    plot_pareto(ratings, results, os.path.join(out_dir, 'pareto.png'))
  return results


def format_table(results: Sequence[Result]) -> str:
  lines = [f'{"rank":>4} {"score":>10} {"MFLOPs":>8} {"Mparams":>8} {"MMACs":>8}  architecture']
  for rank, r in enumerate(results, 1):
    lines.append(f'{rank:>4} {r.score:>10.5f} {r.flops / 1e6:>8.2f} {r.params / 1e6:>8.3f} {r.macs / 1e6:>8.2f}  '
                 f'{r.architecture}')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dna_jax.search', description=__doc__.splitlines()[0])
  parser.add_argument('--ratings', required=True, help='ratings directory (WORKDIR/ratings)')
  parser.add_argument('--max_flops', type=float, default=None, help='FLOPs budget, e.g. 400e6')
  parser.add_argument('--max_params', type=float, default=None, help='parameter budget, e.g. 5.3e6')
  parser.add_argument('--top_k', type=int, default=1)
  parser.add_argument('--json', action='store_true', help='print the results as JSON')
  parser.add_argument('--out', default=None, help='output directory (default: WORKDIR/search)')
  parser.add_argument('--overwrite', action='store_true', help='replace existing arch_*.json / pareto.png')
  parser.add_argument('--no_plot', action='store_true', help='skip pareto.png')
  args = parser.parse_args(argv)
  as_int = lambda x: None if x is None else int(x)
  start = time.perf_counter()
  try:
    results = run_search(args.ratings, args.out, as_int(args.max_flops), as_int(args.max_params), args.top_k,
                         args.overwrite, plot=not args.no_plot)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps([{**r.to_dict(), 'rank': i} for i, r in enumerate(results, 1)], indent=1))
  else:
    print(format_table(results))
    print(f'({len(results)} nets, {time.perf_counter() - start:.2f} s; files in '
          f'{args.out or default_out_dir(args.ratings)})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
