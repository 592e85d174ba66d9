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
2. Lower bounds on the best score of the remaining blocks for a remaining budget, per position
   and input width: the exact Pareto front (cost, best score) of the remaining blocks for each
   budget alone, and with both budgets a knapsack table over a 256x256 grid of budget buckets
   (costs rounded down, so it never overestimates).
3. An upper bound: the k-th best score of the nets a small beam search (width 32) finds.
4. Best-first search over blocks (A*), expanding nodes in vectorised batches and dropping every
   child whose score bound exceeds the upper bound. A node's priority (score + bound, flops +
   cheapest rest, params + cheapest rest, choices so far) never exceeds that of any of its
   completions, so complete nets come out exactly in ranking order.
Measured on the default space (benchmarks/search_speed.py, one core): 0.02-0.08 s for top_k=1 and
0.2-0.4 s for top_k=10, with random or cost-correlated scores; smooth noise-free ratings with
both budgets binding are the slow case (seconds).

Ranking order (deterministic tie-breaking): summed score, then total FLOPs, then total params,
then the choices block by block, each as (cell index, path index in `Cell.paths()` order).
Scores are compared on a fixed-point grid of 2^-e (e chosen so the largest possible sum stays
below 2^53, about 1e-15 relative), so sums are exact whatever the order of addition and equal
scores tie exactly. Reported scores are the plain float sums in block order.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import heapq
import math
from typing import Any

import numpy as np

from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib

GRID_2D = 256  # buckets per budget of the joint table, used when both budgets are set
_CHUNK = 1 << 21  # elements per temporary array in pairwise steps
BEAM = 32  # width of the beam search that finds an upper bound first


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
  rows: tuple[int, ...]  # row of each block in `Ratings.blocks[k]`

  def to_dict(self) -> dict[str, Any]:
    return {
      **self.architecture.to_dict(),
      'score': self.score,
      'flops': self.flops,
      'params': self.params,
      'macs': self.macs,
      'block_scores': list(self.block_scores),
    }


@dataclasses.dataclass(frozen=True)
class _Candidates:
  """Rows of one block for one input width, after pruning."""

  score: np.ndarray  # float64 holding fixed-point integers
  flops: np.ndarray
  params: np.ndarray
  nxt: np.ndarray  # index of the output width in the next position's width list
  cell: np.ndarray
  path: np.ndarray
  row: np.ndarray

  @functools.cached_property
  def groups(self) -> list[tuple[int, slice]]:
    """(output width index, rows) per output width; rows are contiguous and sorted by score."""
    starts = np.flatnonzero(np.r_[True, self.nxt[1:] != self.nxt[:-1]])
    ends = np.r_[starts[1:], len(self.nxt)]
    return [(int(self.nxt[a]), slice(int(a), int(b))) for a, b in zip(starts, ends)]


def _score_scale(ratings: ratings_lib.Ratings) -> float:
  """Power of two that turns scores into integers whose sums stay exact in float64."""
  largest = max(float(np.abs(b.score).max()) for b in ratings.blocks) * len(ratings.blocks)
  return 1.0 if largest == 0 else 2.0 ** (52 - math.ceil(math.log2(largest)))


def _widths(space: space_lib.SearchSpace) -> list[list[int]]:
  """Input widths of every position 0..N; position N holds the last block's widths."""
  widths = [space_lib.block_input_widths(space, m) for m in range(len(space.blocks))]
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
          kept.append(
            rows[
              _dominance_keep(
                score[rows], table.flops[rows], table.params[rows], table.cell[rows], table.path[rows], top_k
              )
            ]
          )
      rows = np.concatenate(kept)  # by output width, then score (see _Candidates.groups)
      rows = rows[np.lexsort((table.path[rows], table.cell[rows], score[rows], cell_width[rows]))]
      per_width[w_in] = _Candidates(
        score[rows],
        table.flops[rows],
        table.params[rows],
        np.searchsorted(widths[m + 1], cell_width[rows]),
        table.cell[rows],
        table.path[rows],
        rows,
      )
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
      sum_cost = (acc_cost[lo : lo + step, None] + cost[None]).ravel()
      sum_score = (acc_score[lo : lo + step, None] + score[None]).ravel()
      if limit is not None:
        keep = sum_cost <= limit[w_to]
        sum_cost, sum_score = sum_cost[keep], sum_score[keep]
      if len(sum_cost):
        parts.setdefault(w_to, []).append(_skyline(sum_cost, sum_score))
  return {w: _skyline(np.concatenate([c for c, _ in p]), np.concatenate([s for _, s in p])) for w, p in parts.items()}


def _suffix_fronts(
  cands: list[dict[int, _Candidates]], widths: list[list[int]], field: str, budget: int
) -> list[dict[int, tuple]]:
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
        np.minimum(target, nxt[o, : grid + 1 - f, : grid + 1 - p] + s, out=target)
    tables.insert(0, table)
  rest_low = [np.r_[np.cumsum([low[i] for low in lows][::-1])[::-1], 0] for i in range(2)]
  return tables, slack, rest_low


def _raw_minimum(ratings: ratings_lib.Ratings, field: str) -> int:
  """Smallest total of `field` over the whole space, fixed part included."""
  widths = _widths(ratings.space)
  best = dict.fromkeys(widths[0], 0)
  for m, (block, table) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    cell_width = np.array([c.width for c in block.cells])[table.cell]
    values = getattr(table, field)
    best = {
      w_out: min(
        best[w_in] + int(values[(table.in_channels == w_in) & (cell_width == w_out)].min())
        for w_in in widths[m]
        if np.any((table.in_channels == w_in) & (cell_width == w_out))
      )
      for w_out in widths[m + 1]
    }
  return min(best.values()) + getattr(ratings, f'fixed_{field}')


def _check_budget(ratings: ratings_lib.Ratings, budget: int | None, field: str, name: str) -> None:
  if budget is None:
    return
  lowest = _raw_minimum(ratings, field)
  if budget < lowest:
    label = 'FLOPs' if field == 'flops' else 'params'
    raise ValueError(
      f'{name}={budget:,} is below the cheapest architecture of the space: the minimum '
      f'achievable {label} is {lowest:,} ({lowest / 1e6:.2f}M)'
    )


@dataclasses.dataclass
class _Problem:
  """Pruned candidates and the lower-bound tables of one search."""

  cands: list[dict[int, _Candidates]]
  widths: list[list[int]]
  budgets: dict[str, int | None]  # what the budgets leave after the fixed cost
  min_score: list[np.ndarray]  # per position and input width: cheapest rest, unconstrained
  min_flops: list[np.ndarray]
  min_params: list[np.ndarray]
  fronts: dict[str, list[dict[int, tuple]]]
  joint: tuple | None

  @property
  def active(self) -> list[str]:
    return [f for f in ('flops', 'params') if self.budgets[f] is not None]


def _problem(ratings: ratings_lib.Ratings, max_flops: int | None, max_params: int | None, top_k: int) -> _Problem:
  cands = _candidates(ratings, _score_scale(ratings), top_k)
  widths = _widths(ratings.space)
  budgets = {
    'flops': None if max_flops is None else max_flops - ratings.fixed_flops,
    'params': None if max_params is None else max_params - ratings.fixed_params,
  }
  active = [f for f in ('flops', 'params') if budgets[f] is not None]
  fronts = {f: _suffix_fronts(cands, widths, f, budgets[f]) for f in active}
  joint = _joint_table(cands, widths, [budgets[f] for f in active], GRID_2D) if len(active) == 2 else None
  return _Problem(
    cands,
    widths,
    budgets,
    _suffix_min(cands, widths, 'score'),
    _suffix_min(cands, widths, 'flops'),
    _suffix_min(cands, widths, 'params'),
    fronts,
    joint,
  )


def _children(
  problem: _Problem, m: int, wi: int, score: np.ndarray, flops: np.ndarray, params: np.ndarray, upper: float = np.inf
):
  """The children in block m of nodes entering it at width index wi (costs exclude the fixed part).

  Returns (node, lb_score, lb_flops, lb_params, score, flops, params, nxt, cell, path, row): the
  children of each node contiguous and sorted by priority, leaving out those that cannot fit the
  budgets or whose score bound exceeds `upper`.
  """
  c = problem.cands[m][problem.widths[m][wi]]
  nodes, picks = [], []
  for o, rows in c.groups:  # only the candidates whose score can still beat `upper`
    count = np.searchsorted(c.score[rows], upper - score - problem.min_score[m + 1][o], 'right')
    node = np.repeat(np.arange(len(score)), count)
    nodes.append(node)
    picks.append(rows.start + np.arange(len(node)) - np.repeat(np.cumsum(count) - count, count))
  node, pick = np.concatenate(nodes), np.concatenate(picks)
  s2, f2, p2 = score[node] + c.score[pick], flops[node] + c.flops[pick], params[node] + c.params[pick]
  nxt = c.nxt[pick]
  lb_s = s2 + problem.min_score[m + 1][nxt]
  for field in problem.active:
    left = problem.budgets[field] - (f2 if field == 'flops' else p2)
    bound = np.full(len(s2), np.inf)
    for o, _ in c.groups:
      front = problem.fronts[field][m + 1].get(problem.widths[m + 1][o])
      if front is not None:
        at = np.flatnonzero(nxt == o)
        index = np.searchsorted(front[0], left[at], 'right') - 1
        bound[at] = np.where(index >= 0, front[1][np.maximum(index, 0)], np.inf)
    lb_s = np.maximum(lb_s, s2 + bound)
    keep = np.flatnonzero(np.isfinite(lb_s) & (lb_s <= upper))  # inf: the rest cannot fit the budget
    node, pick, s2, f2, p2, nxt, lb_s = (a[keep] for a in (node, pick, s2, f2, p2, nxt, lb_s))
  if problem.joint is not None:
    tables, slack, rest_low = problem.joint
    index = [nxt]
    for i, field in enumerate(problem.active):
      rest = problem.budgets[field] - (f2 if field == 'flops' else p2) - rest_low[i][m + 1]
      index.append(np.clip(rest * GRID_2D // max(slack[i], 1), 0, GRID_2D))
    lb_s = np.maximum(lb_s, s2 + tables[m + 1][tuple(index)])
  keep = np.flatnonzero(lb_s <= upper)
  node, pick, s2, f2, p2, nxt, lb_s = (a[keep] for a in (node, pick, s2, f2, p2, nxt, lb_s))
  lb_f = f2 + problem.min_flops[m + 1][nxt]
  lb_p = p2 + problem.min_params[m + 1][nxt]
  order = np.lexsort((c.path[pick], c.cell[pick], lb_p, lb_f, lb_s, node))
  pick = pick[order]
  return (
    node[order],
    lb_s[order],
    lb_f[order],
    lb_p[order],
    s2[order],
    f2[order],
    p2[order],
    nxt[order],
    c.cell[pick],
    c.path[pick],
    c.row[pick],
  )


def _upper_bound(problem: _Problem, top_k: int, width: int = BEAM) -> float:
  """Score of the k-th best of some k distinct feasible nets (a beam search), or inf if it finds fewer."""
  nodes = (np.zeros(1), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
  for m in range(len(problem.cands)):
    parts = [_children(problem, m, wi, *(a[nodes[3] == wi] for a in nodes[:3])) for wi in np.unique(nodes[3])]
    lb_s, lb_f, lb_p, s, f, p, nxt = (np.concatenate([part[j] for part in parts]) for j in (1, 2, 3, 4, 5, 6, 7))
    best = np.lexsort((lb_p, lb_f, lb_s))[: width if m < len(problem.cands) - 1 else top_k]
    nodes = (s[best], f[best], p[best], nxt[best])
  return float(nodes[0][-1]) if len(nodes[0]) == top_k else np.inf


def search(
  ratings: ratings_lib.Ratings, max_flops: int | None = None, max_params: int | None = None, top_k: int = 1
) -> list[Result]:
  """The `top_k` nets of lowest summed score within the budgets, best first (exact; see module doc)."""
  if top_k < 1:
    raise ValueError(f'top_k must be >= 1, got {top_k}')
  _check_budget(ratings, max_flops, 'flops', 'max_flops')
  _check_budget(ratings, max_params, 'params', 'max_params')
  problem = _problem(ratings, max_flops, max_params, top_k)
  upper = _upper_bound(problem, top_k)
  last = len(problem.cands) - 1
  # Best-first search. An expansion holds the sorted children of one node; the heap holds, per
  # expansion, its best child not yet taken: (score bound, flops bound, params bound, choices key,
  # expansion, position). Nodes are expanded in batches (one vectorised step per batch); a complete
  # net is accepted only when it is the heap's minimum and no popped node awaits expansion.
  expansions: list[tuple] = []
  heap: list[tuple] = []
  found: list[tuple[int, ...]] = []

  def push(e: int, i: int, key: tuple[int, ...]) -> None:
    _, lb_s, lb_f, lb_p, *_, cell, path, _ = expansions[e][0]
    heapq.heappush(heap, (lb_s[i].item(), lb_f[i].item(), lb_p[i].item(), key + (cell[i].item(), path[i].item()), e, i))

  def expand(m: int, nodes: list[tuple]) -> None:
    """nodes: (score, flops, params, width index, key, rows) entering block m."""
    for wi in sorted({node[3] for node in nodes}):
      same = [node for node in nodes if node[3] == wi]
      step = max(1, _CHUNK // len(problem.cands[m][problem.widths[m][wi]].score))
      for group in (same[lo : lo + step] for lo in range(0, len(same), step)):
        arrays = _children(problem, m, wi, *(np.array([node[j] for node in group]) for j in range(3)), upper)
        bounds = np.searchsorted(arrays[0], np.arange(len(group) + 1))
        for j, node in enumerate(group):
          if bounds[j] < bounds[j + 1]:
            expansions.append((tuple(a[bounds[j] : bounds[j + 1]] for a in arrays), m, node[5]))
            push(len(expansions) - 1, 0, node[4])

  expand(0, [(0.0, 0, 0, 0, (), ())])
  batch_size = 1
  while heap and len(found) < top_k:
    pending: dict[int, list] = {}
    while heap and sum(map(len, pending.values())) < batch_size:
      children, m, rows = expansions[heap[0][4]]
      if m == last and pending:
        break  # complete, but pending expansions may still yield better nets
      _, _, _, key, e, i = heapq.heappop(heap)
      if i + 1 < len(children[0]):
        push(e, i + 1, key[:-2])
      chosen = rows + (int(children[10][i]),)
      if m == last:
        found.append(chosen)
        if len(found) == top_k:
          break
      else:
        pending.setdefault(m + 1, []).append(
          (children[4][i], children[5][i], children[6][i], int(children[7][i]), key, chosen)
        )
    for m, nodes in pending.items():
      expand(m, nodes)
    batch_size = min(2 * batch_size, 512)
  if not found:  # only possible with both budgets: each alone was checked above
    raise ValueError(
      f'no architecture of the space meets both max_flops={max_flops} and max_params={max_params} '
      f'(each alone is achievable: minimum FLOPs {_raw_minimum(ratings, "flops"):,}, minimum '
      f'params {_raw_minimum(ratings, "params"):,})'
    )
  return [_result(ratings, rows) for rows in found]


def _result(ratings: ratings_lib.Ratings, rows: Sequence[int]) -> Result:
  choices = tuple((int(b.cell[r]), b.ops[r]) for b, r in zip(ratings.blocks, rows))
  arch = space_lib.make_architecture(ratings.space, choices)
  block_scores = tuple(float(b.score[r]) for b, r in zip(ratings.blocks, rows))
  total = lambda field: (
    getattr(ratings, f'fixed_{field}') + sum(int(getattr(b, field)[r]) for b, r in zip(ratings.blocks, rows))
  )
  return Result(
    arch,
    float(sum(block_scores)),
    total('flops'),
    total('params'),
    total('macs'),
    choices,
    block_scores,
    tuple(int(r) for r in rows),
  )


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
  costs, scores = _skyline(
    np.concatenate([c for c, _ in front.values()]), np.concatenate([s for _, s in front.values()])
  )
  return costs, scores / scale
