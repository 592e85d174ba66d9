"""Lower bounds and fronts for the exact search (NumPy): what the rest of a net can still score.

Helpers of `search.py`, over its per-block candidates (objects with `score` (fixed-point), `flops`,
`params`, `latency`, `nxt` arrays and `groups`): the cheapest rest of a net per position and width, the
exact (cost, best score) staircases of the remaining blocks, and a joint FLOPs x params knapsack table
on a grid of budget buckets (costs rounded down, so it never overestimates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CHUNK = 1 << 21  # elements per temporary array in pairwise steps


def suffix_min(cands: list[dict[int, Any]], widths: list[list[int]], field: str) -> list[np.ndarray]:
  """Per position m and input width: the smallest sum of `field` over blocks m..N-1."""
  best = [np.zeros(len(widths[-1]))]
  for m in range(len(cands) - 1, -1, -1):
    nxt = best[0]
    best.insert(0, np.array([(getattr(c, field) + nxt[c.nxt]).min() for c in cands[m].values()], dtype=np.float64))
  return best


def prefix_min(cands: list[dict[int, Any]], widths: list[list[int]], field: str) -> list[dict[int, int]]:
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


def skyline(cost: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Points not dominated in (cost, score): increasing cost, strictly decreasing score."""
  order = np.argsort(cost, kind='stable')
  cost, score = cost[order], score[order]
  starts = np.flatnonzero(np.r_[True, cost[1:] != cost[:-1]])
  cost, score = cost[starts], np.minimum.reduceat(score, starts)
  keep = score < np.r_[np.inf, np.minimum.accumulate(score)[:-1]]
  return cost[keep], score[keep]


def merge(fronts: dict[int, tuple], groups: Sequence[tuple], limit: dict[int, int] | None = None) -> dict[int, tuple]:
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
    step = max(1, CHUNK // len(cost))
    for lo in range(0, len(acc_cost), step):
      sum_cost = (acc_cost[lo : lo + step, None] + cost[None]).ravel()
      sum_score = (acc_score[lo : lo + step, None] + score[None]).ravel()
      if limit is not None:
        keep = sum_cost <= limit[w_to]
        sum_cost, sum_score = sum_cost[keep], sum_score[keep]
      if len(sum_cost):
        parts.setdefault(w_to, []).append(skyline(sum_cost, sum_score))
  return {w: skyline(np.concatenate([c for c, _ in p]), np.concatenate([s for _, s in p])) for w, p in parts.items()}


def suffix_fronts(
  cands: list[dict[int, Any]], widths: list[list[int]], field: str, budget: int
) -> list[dict[int, tuple]]:
  """fronts[m][w] (m >= 1): exact (cost, best score) staircase of blocks m..N-1 entered at width w,
  costs limited to what `budget` (fixed part excluded) leaves after the cheapest way to reach m."""
  reach = prefix_min(cands, widths, field)
  fronts = [{w: (np.zeros(1, np.int64), np.zeros(1)) for w in widths[-1]}]
  for m in range(len(cands) - 1, 0, -1):  # position 0 is never queried
    groups = []
    for w_in, c in cands[m].items():
      values = getattr(c, field)
      for o, at in c.groups:
        groups.append((widths[m + 1][o], w_in, *skyline(values[at], c.score[at])))
    limit = {w: budget - reach[m][w] for w in widths[m] if w in reach[m]}
    fronts.insert(0, merge(fronts[0], groups, limit))
  return [{}] + fronts


def bucket(values: np.ndarray, slack: int, grid: int) -> np.ndarray:
  """Cost above the block minimum in grid units, rounded down (budgets rounded down too: a relaxation)."""
  return np.minimum(values * grid // max(slack, 1), grid + 1)


def joint_table(cands: list[dict[int, Any]], widths: list[list[int]], budgets: Sequence[int], grid: int):
  """tables[m][w, bf, bp]: lowest score of blocks m.. whose bucketed FLOPs and params sum to at most (bf, bp)."""
  fields = ('flops', 'params')
  lows = [[min(int(getattr(c, f).min()) for c in cands_m.values()) for f in fields] for cands_m in cands]
  slack = [budget - sum(low[i] for low in lows) for i, budget in enumerate(budgets)]
  tables = [np.zeros((len(widths[-1]), grid + 1, grid + 1))]
  for m in range(len(cands) - 1, -1, -1):
    nxt = tables[0]
    table = np.full((len(widths[m]), grid + 1, grid + 1), np.inf)
    for wi, c in enumerate(cands[m].values()):
      bf, bp = (bucket(getattr(c, f) - lows[m][i], slack[i], grid) for i, f in enumerate(fields))
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
