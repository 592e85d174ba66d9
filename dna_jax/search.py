"""Exact constrained search: the k nets with the lowest summed block score under FLOPs/params/latency budgets.

Problem: pick one rated (cell, path) per block, minimising the sum of block scores subject to
total FLOPs <= max_flops, total params <= max_params and, with a latency table
(latency_table.with_latency), predicted latency <= max_latency_ms (fixed stem/DS/head cost included).
Block costs are additive given the previous block's width (a block's first layer reads it), so
the width of the previous block is the only state passed between blocks.

Rows that adaptive rating stopped early (BlockRatings.pruned) are left out: each has at least
`ratings.pruned_for_top_k` cheaper, clearly better rivals, so top_k up to that number stays exact.

Algorithm (exact, not a heuristic):
1. Per block and per (input width, output width), candidates with identical costs (flops, params
   and, under a latency budget, latency) keep their k best; then every candidate dominated by >= k
   others of its group (no worse in score and every cost, better in the ranking order below) is
   dropped: each net using it would have k strictly better feasible nets, so it is not in the top k.
2. Lower bounds on the best score of the remaining blocks for a remaining budget, per position
   and input width: the exact Pareto front (cost, best score) of the remaining blocks for each
   budget alone, and with FLOPs and params budgets a knapsack table over a 256x256 grid of budget
   buckets (costs rounded down, so it never overestimates).
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
from dna_jax import search_bounds
from dna_jax import space as space_lib

GRID_2D = 256  # buckets per budget of the joint table, used when FLOPs and params budgets are set
COSTS = ('flops', 'params', 'latency')  # latency in integer nanoseconds (latency_table.with_latency)
_CHUNK = search_bounds.CHUNK
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
  latency_ms: float | None = None  # predicted, when the ratings carry a latency table

  def to_dict(self) -> dict[str, Any]:
    record = {
      **self.architecture.to_dict(),
      'score': self.score,
      'flops': self.flops,
      'params': self.params,
      'macs': self.macs,
      'block_scores': list(self.block_scores),
    }
    if self.latency_ms is not None:
      record['latency_ms'] = self.latency_ms
    return record


@dataclasses.dataclass(frozen=True)
class _Candidates:
  """Rows of one block for one input width, after pruning."""

  score: np.ndarray  # float64 holding fixed-point integers
  flops: np.ndarray
  params: np.ndarray
  latency: np.ndarray  # zeros without a latency table
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


def _dominance_keep(score, costs: Sequence[np.ndarray], cell, path, top_k: int) -> np.ndarray:
  """Indices of the rows of one group that are dominated by fewer than `top_k` others (in score and every cost)."""
  order = np.lexsort((path, cell, score, *costs[::-1]))
  cs, s = [c[order] for c in costs], score[order]
  new = np.r_[True, np.any([c[1:] != c[:-1] for c in cs], axis=0)]
  cls = np.cumsum(new) - 1
  start = np.flatnonzero(new)
  rank = np.arange(len(order)) - start[cls]
  keep = rank < top_k
  order, cls, rank, s = order[keep], cls[keep], rank[keep], s[keep]
  num = len(start)
  table = np.full((num, top_k), np.inf)
  table[cls, rank] = s
  class_costs = [c[start] for c in cs]
  kth = np.empty((num, top_k))
  step = max(1, _CHUNK // (num * top_k))
  for lo in range(0, num, step):
    hi = min(num, lo + step)
    dom = np.all([c[None, :] <= c[lo:hi, None] for c in class_costs], axis=0)
    dom[np.arange(hi - lo), np.arange(lo, hi)] = False
    values = np.where(dom[:, :, None], table[None], np.inf).reshape(hi - lo, num * top_k)
    part = np.partition(values, top_k - 1, axis=1)[:, :top_k]
    kth[lo:hi] = np.sort(part, axis=1)
  # a row of rank r is dominated by r rows of its class and by every row of a cheaper class
  # with a score no higher; it goes when those reach top_k.
  dominated = kth[cls, top_k - 1 - rank] <= s
  return order[~dominated]


def _latency(table: ratings_lib.BlockRatings) -> np.ndarray:
  return table.latency if table.latency is not None else np.zeros(len(table), np.int64)


def _candidates(
  ratings: ratings_lib.Ratings, scale: float, top_k: int, fields: Sequence[str] = ('flops', 'params')
) -> list[dict[int, _Candidates]]:
  """Per block and input width, the rows that can be in the top k when `fields` are the constrained costs."""
  widths = _widths(ratings.space)
  out = []
  for m, (block, table) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    cell_width = np.array([c.width for c in block.cells])[table.cell]
    score = np.rint(table.score * scale)
    costs = {'flops': table.flops, 'params': table.params, 'latency': _latency(table)}
    pruned = table.pruned  # adaptive rating's dominated paths: in none of the best ratings.pruned_for_top_k
    per_width = {}
    for w_in in widths[m]:
      kept = []
      for w_out in widths[m + 1]:
        rows = np.flatnonzero((table.in_channels == w_in) & (cell_width == w_out) & ~pruned)
        if len(rows):
          dominance_costs = [costs[f][rows] for f in fields]
          kept.append(rows[_dominance_keep(score[rows], dominance_costs, table.cell[rows], table.path[rows], top_k)])
      rows = np.concatenate(kept)  # by output width, then score (see _Candidates.groups)
      rows = rows[np.lexsort((table.path[rows], table.cell[rows], score[rows], cell_width[rows]))]
      per_width[w_in] = _Candidates(
        score[rows],
        table.flops[rows],
        table.params[rows],
        costs['latency'][rows],
        np.searchsorted(widths[m + 1], cell_width[rows]),
        table.cell[rows],
        table.path[rows],
        rows,
      )
    out.append(per_width)
  return out


def _raw_minimum(ratings: ratings_lib.Ratings, field: str) -> int:
  """Smallest total of `field` over the whole space, fixed part included."""
  widths = _widths(ratings.space)
  best = dict.fromkeys(widths[0], 0)
  for m, (block, table) in enumerate(zip(ratings.space.blocks, ratings.blocks)):
    cell_width = np.array([c.width for c in block.cells])[table.cell]
    values = _latency(table) if field == 'latency' else getattr(table, field)
    best = {
      w_out: min(
        best[w_in] + int(values[(table.in_channels == w_in) & (cell_width == w_out)].min())
        for w_in in widths[m]
        if np.any((table.in_channels == w_in) & (cell_width == w_out))
      )
      for w_out in widths[m + 1]
    }
  return min(best.values()) + getattr(ratings, f'fixed_{field}')


def _check_budget(ratings: ratings_lib.Ratings, budget: int | None, field: str) -> None:
  if budget is None:
    return
  if field == 'latency' and ratings.blocks[0].latency is None:
    raise ValueError('a latency budget needs a latency table (latency_table.with_latency)')
  lowest = _raw_minimum(ratings, field)
  if budget < lowest:
    if field == 'latency':
      raise ValueError(
        f'max_latency_ms={budget / 1e6:g} is below the fastest architecture of the space: the minimum '
        f'predicted latency is {lowest / 1e6:.3f} ms'
      )
    label = 'FLOPs' if field == 'flops' else 'params'
    raise ValueError(
      f'max_{field}={budget:,} is below the cheapest architecture of the space: the minimum '
      f'achievable {label} is {lowest:,} ({lowest / 1e6:.2f}M)'
    )


@dataclasses.dataclass
class _Problem:
  """Pruned candidates and the lower-bound tables of one search."""

  cands: list[dict[int, _Candidates]]
  widths: list[list[int]]
  budgets: dict[str, int | None]  # what the budgets leave after the fixed cost, per COSTS field
  min_score: list[np.ndarray]  # per position and input width: cheapest rest, unconstrained
  min_flops: list[np.ndarray]
  min_params: list[np.ndarray]
  fronts: dict[str, list[dict[int, tuple]]]
  joint: tuple | None

  @property
  def active(self) -> list[str]:
    return [f for f in COSTS if self.budgets[f] is not None]


def _problem(ratings: ratings_lib.Ratings, budgets: dict[str, int | None], top_k: int) -> _Problem:
  budgets = {f: None if budgets.get(f) is None else budgets[f] - getattr(ratings, f'fixed_{f}') for f in COSTS}
  active = [f for f in COSTS if budgets[f] is not None]
  cands = _candidates(
    ratings, _score_scale(ratings), top_k, ['flops', 'params'] + (['latency'] * ('latency' in active))
  )
  widths = _widths(ratings.space)
  fronts = {f: search_bounds.suffix_fronts(cands, widths, f, budgets[f]) for f in active}
  both = budgets['flops'] is not None and budgets['params'] is not None
  joint = search_bounds.joint_table(cands, widths, [budgets['flops'], budgets['params']], GRID_2D) if both else None
  return _Problem(
    cands,
    widths,
    budgets,
    search_bounds.suffix_min(cands, widths, 'score'),
    search_bounds.suffix_min(cands, widths, 'flops'),
    search_bounds.suffix_min(cands, widths, 'params'),
    fronts,
    joint,
  )


def _children(
  problem: _Problem,
  m: int,
  wi: int,
  score: np.ndarray,
  flops: np.ndarray,
  params: np.ndarray,
  latency: np.ndarray,
  upper: float = np.inf,
):
  """The children in block m of nodes entering it at width index wi (costs exclude the fixed part).

  Returns (node, lb_score, lb_flops, lb_params, score, flops, params, latency, nxt, cell, path, row):
  the children of each node contiguous and sorted by priority, leaving out those that cannot fit the
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
  l2 = latency[node] + c.latency[pick]
  nxt = c.nxt[pick]
  lb_s = s2 + problem.min_score[m + 1][nxt]
  for field in problem.active:
    left = problem.budgets[field] - {'flops': f2, 'params': p2, 'latency': l2}[field]
    bound = np.full(len(s2), np.inf)
    for o, _ in c.groups:
      front = problem.fronts[field][m + 1].get(problem.widths[m + 1][o])
      if front is not None:
        at = np.flatnonzero(nxt == o)
        index = np.searchsorted(front[0], left[at], 'right') - 1
        bound[at] = np.where(index >= 0, front[1][np.maximum(index, 0)], np.inf)
    lb_s = np.maximum(lb_s, s2 + bound)
    keep = np.flatnonzero(np.isfinite(lb_s) & (lb_s <= upper))  # inf: the rest cannot fit the budget
    node, pick, s2, f2, p2, l2, nxt, lb_s = (a[keep] for a in (node, pick, s2, f2, p2, l2, nxt, lb_s))
  if problem.joint is not None:
    tables, slack, rest_low = problem.joint
    index = [nxt]
    for i, spent in enumerate((f2, p2)):
      rest = problem.budgets[('flops', 'params')[i]] - spent - rest_low[i][m + 1]
      index.append(np.clip(rest * GRID_2D // max(slack[i], 1), 0, GRID_2D))
    lb_s = np.maximum(lb_s, s2 + tables[m + 1][tuple(index)])
  keep = np.flatnonzero(lb_s <= upper)
  node, pick, s2, f2, p2, l2, nxt, lb_s = (a[keep] for a in (node, pick, s2, f2, p2, l2, nxt, lb_s))
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
    l2[order],
    nxt[order],
    c.cell[pick],
    c.path[pick],
    c.row[pick],
  )


def _upper_bound(problem: _Problem, top_k: int, width: int = BEAM) -> float:
  """Score of the k-th best of some k distinct feasible nets (a beam search), or inf if it finds fewer."""
  nodes = (np.zeros(1), *(np.zeros(1, np.int64) for _ in range(4)))  # score, flops, params, latency, width
  for m in range(len(problem.cands)):
    parts = [_children(problem, m, wi, *(a[nodes[4] == wi] for a in nodes[:4])) for wi in np.unique(nodes[4])]
    lb_s, lb_f, lb_p, s, f, p, lat, nxt = (np.concatenate([part[j] for part in parts]) for j in range(1, 9))
    best = np.lexsort((lb_p, lb_f, lb_s))[: width if m < len(problem.cands) - 1 else top_k]
    nodes = (s[best], f[best], p[best], lat[best], nxt[best])
  return float(nodes[0][-1]) if len(nodes[0]) == top_k else np.inf


def _check_pruning(ratings: ratings_lib.Ratings, top_k: int, latency: bool) -> None:
  """Adaptively rated tables answer exactly only within what their pruning assumed."""
  if not ratings.pruned_for_top_k:
    return
  where = ratings.directory or 'these ratings'
  if top_k > ratings.pruned_for_top_k:
    raise ValueError(
      f'{where} were rated adaptively for the top {ratings.pruned_for_top_k} nets; top_k={top_k} needs paths '
      'it stopped rating early: ask for fewer, or rate again with --config.rate.keep (or rate.adaptive=False)'
    )
  if latency and not any(c.startswith('latency:') for c in ratings.pruned_costs):
    raise ValueError(
      f'{where} were rated adaptively, pruning on FLOPs and params only: a latency budget needs ratings '
      'pruned on latency too (rate with --config.search.latency_table=DIR) or exhaustive ones '
      '(--config.rate.adaptive=False)'
    )


def search(
  ratings: ratings_lib.Ratings,
  max_flops: int | None = None,
  max_params: int | None = None,
  top_k: int = 1,
  max_latency_ms: float | None = None,
) -> list[Result]:
  """The `top_k` nets of lowest summed score within the budgets, best first (exact; see module doc).

  `max_latency_ms` needs ratings with a latency table (latency_table.with_latency).
  """
  if top_k < 1:
    raise ValueError(f'top_k must be >= 1, got {top_k}')
  budgets = {
    'flops': max_flops,
    'params': max_params,
    'latency': None if max_latency_ms is None else round(max_latency_ms * 1e6),
  }
  for field, budget in budgets.items():
    _check_budget(ratings, budget, field)
  _check_pruning(ratings, top_k, budgets['latency'] is not None)
  problem = _problem(ratings, budgets, top_k)
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
    """nodes: (score, flops, params, latency, width index, key, rows) entering block m."""
    for wi in sorted({node[4] for node in nodes}):
      same = [node for node in nodes if node[4] == wi]
      step = max(1, _CHUNK // len(problem.cands[m][problem.widths[m][wi]].score))
      for group in (same[lo : lo + step] for lo in range(0, len(same), step)):
        arrays = _children(problem, m, wi, *(np.array([node[j] for node in group]) for j in range(4)), upper)
        bounds = np.searchsorted(arrays[0], np.arange(len(group) + 1))
        for j, node in enumerate(group):
          if bounds[j] < bounds[j + 1]:
            expansions.append((tuple(a[bounds[j] : bounds[j + 1]] for a in arrays), m, node[6]))
            push(len(expansions) - 1, 0, node[5])

  expand(0, [(0.0, 0, 0, 0, 0, (), ())])
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
      chosen = rows + (int(children[11][i]),)
      if m == last:
        found.append(chosen)
        if len(found) == top_k:
          break
      else:
        pending.setdefault(m + 1, []).append(
          (*(children[j][i] for j in (4, 5, 6, 7)), int(children[8][i]), key, chosen)
        )
    for m, nodes in pending.items():
      expand(m, nodes)
    batch_size = min(2 * batch_size, 512)
  if not found:  # only possible with several budgets: each alone was checked above
    given = ', '.join(f'max_{f}={b}' for f, b in budgets.items() if b is not None)
    raise ValueError(f'no architecture of the space meets every budget at once ({given}); each alone is achievable')
  return [_result(ratings, rows) for rows in found]


def _result(ratings: ratings_lib.Ratings, rows: Sequence[int]) -> Result:
  choices = tuple((int(b.cell[r]), b.ops[r]) for b, r in zip(ratings.blocks, rows))
  arch = space_lib.make_architecture(ratings.space, choices)
  block_scores = tuple(float(b.score[r]) for b, r in zip(ratings.blocks, rows))
  total = lambda field: (
    getattr(ratings, f'fixed_{field}') + sum(int(getattr(b, field)[r]) for b, r in zip(ratings.blocks, rows))
  )
  latency = total('latency') / 1e6 if ratings.blocks[0].latency is not None else None
  return Result(
    arch,
    float(sum(block_scores)),
    total('flops'),
    total('params'),
    total('macs'),
    choices,
    block_scores,
    tuple(int(r) for r in rows),
    latency,
  )


# ----------------------------------------------------------------------------- Pareto front


def pareto_front(ratings: ratings_lib.Ratings, cost: str = 'flops') -> tuple[np.ndarray, np.ndarray]:
  """Exact front of summed score against total `cost` ('flops', 'params' or, with a latency table,
  'latency' in ns) over the whole space.

  Returns (costs, scores): every total cost at which the best achievable score improves, costs
  increasing (fixed part included), scores strictly decreasing.
  """
  if cost not in COSTS or (cost == 'latency' and ratings.blocks[0].latency is None):
    raise ValueError(f"cost must be 'flops', 'params' or (with a latency table) 'latency', got {cost!r}")
  _check_pruning(ratings, 1, cost == 'latency')
  scale = _score_scale(ratings)
  widths = _widths(ratings.space)
  cands = _candidates(ratings, scale, 1, (cost,))  # keeps every (cost, score) value of each group's front
  front = {widths[0][0]: (np.array([getattr(ratings, f'fixed_{cost}')], np.int64), np.zeros(1))}
  for m, per_width in enumerate(cands):
    groups = []
    for w_in, c in per_width.items():
      for o, at in c.groups:
        groups.append((w_in, widths[m + 1][o], *search_bounds.skyline(getattr(c, cost)[at], c.score[at])))
    front = search_bounds.merge(front, groups)
  costs, scores = search_bounds.skyline(
    np.concatenate([c for c, _ in front.values()]), np.concatenate([s for _, s in front.values()])
  )
  return costs, scores / scale
