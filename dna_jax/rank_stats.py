"""Statistics of ranking studies (NumPy only): rank correlations, partial tau, bootstrap intervals,
and the comparison of the search's choice with random nets of equal cost.

Correlations are vectorised along the last axis, so that thousands of bootstrap resamples are one
call; ties are handled as scipy.stats does (tau-b, average ranks), and a statistic that is undefined
(one side constant) is NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import numpy as np


def kendall_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Kendall's tau-b (ties handled as scipy.stats.kendalltau) along the last axis; NaN if x or y is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.shape[-1]
  upper = np.triu(np.ones((n, n), bool), 1)
  sx = np.sign(x[..., :, None] - x[..., None, :])[..., upper]
  sy = np.sign(y[..., :, None] - y[..., None, :])[..., upper]
  denominator = np.sqrt(np.sum(sx != 0, -1) * np.sum(sy != 0, -1).astype(np.float64))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denominator > 0, np.sum(sx * sy, -1) / denominator, np.nan)


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks along the last axis, ties sharing their average rank (scipy.stats.rankdata)."""
  x = np.asarray(x, np.float64)
  below = np.sum(x[..., None, :] < x[..., :, None], -1)
  equal = np.sum(x[..., None, :] == x[..., :, None], -1)
  return below + (equal + 1) / 2


def spearman_rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Spearman's rho (Pearson correlation of average ranks) along the last axis; NaN if x or y is constant."""
  rx, ry = average_ranks(x), average_ranks(y)
  rx = rx - rx.mean(-1, keepdims=True)
  ry = ry - ry.mean(-1, keepdims=True)
  denominator = np.sqrt(np.sum(rx * rx, -1) * np.sum(ry * ry, -1))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denominator > 0, np.sum(rx * ry, -1) / denominator, np.nan)


def with_interval(
  statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
  x: Sequence[float],
  y: Sequence[float],
  resamples: int,
  seed: int,
  level: float = 0.95,
) -> dict[str, float]:
  """{value, low, high}: the statistic and its percentile-bootstrap interval over resampled pairs.

  Resamples where the statistic is undefined (x or y constant) are left out; NaN bounds if all are.
  """
  return with_interval_of(statistic, (x, y), resamples, seed, level)


def correlations(
  quality: Sequence[float], accuracy: Sequence[float], resamples: int, seed: int, level: float = 0.95
) -> dict[str, dict[str, float]]:
  """Kendall tau and Spearman rho of `quality` (higher = predicted better) against accuracy."""
  return {
    'kendall_tau': with_interval(kendall_tau, quality, accuracy, resamples, seed, level),
    'spearman_rho': with_interval(spearman_rho, quality, accuracy, resamples, seed, level),
  }


def partial_kendall_tau(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Kendall's partial tau of x and y with z held fixed (Kendall 1942), along the last axis:
  (t_xy - t_xz t_yz) / sqrt((1 - t_xz^2) (1 - t_yz^2)); NaN where z ranks x or y perfectly."""
  t_xy, t_xz, t_yz = kendall_tau(x, y), kendall_tau(x, z), kendall_tau(y, z)
  denominator = np.sqrt((1 - t_xz**2) * (1 - t_yz**2))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denominator > 0, (t_xy - t_xz * t_yz) / denominator, np.nan)


def with_interval_of(
  statistic: Callable[..., np.ndarray],
  arrays: Sequence[Sequence[float]],
  resamples: int,
  seed: int,
  level: float = 0.95,
) -> dict[str, float]:
  """`with_interval` for a statistic of any number of paired 1-D arrays (resampled together)."""
  arrays = [np.asarray(a, np.float64) for a in arrays]
  if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
    raise ValueError(f'the arrays must be 1-D of one length, got shapes {[a.shape for a in arrays]}')
  value = float(statistic(*arrays))
  low = high = float('nan')
  if resamples > 0:
    index = np.random.default_rng(seed).integers(0, len(arrays[0]), (resamples, len(arrays[0])))
    values = statistic(*(a[index] for a in arrays))
    values = values[np.isfinite(values)]
    if len(values):
      low, high = (float(v) for v in np.percentile(values, [50 * (1 - level), 50 * (1 + level)]))
  return {'value': value, 'low': low, 'high': high}


def percentile_of(value: float, sample: Sequence[float]) -> float:
  """Percentile of `value` within `sample`: ties count half (scipy.stats.percentileofscore, kind='mean')."""
  sample = np.asarray(sample, np.float64)
  return float(50.0 * (np.mean(sample < value) + np.mean(sample <= value)))


def beat_probability(chosen: np.ndarray, others: np.ndarray) -> float:
  """P(one training of the chosen net beats one training of a net drawn from `others`), ties half.

  `chosen`: accuracies (seeds,); `others`: accuracies (nets, seeds).
  """
  chosen, others = np.asarray(chosen, np.float64), np.asarray(others, np.float64)
  diff = chosen[None, :, None] - others[:, None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _bootstrap_nets(groups: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
  """One bootstrap resample of (nets, seeds) accuracy tables: nets within a group, seeds within a net
  (a group with one net, the searched one, keeps it and resamples its seeds)."""
  out = []
  for table in groups:
    nets = rng.integers(0, len(table), len(table)) if len(table) > 1 else np.zeros(1, np.int64)
    seeds = rng.integers(0, table.shape[1], table.shape)
    out.append(table[nets[:, None], seeds])
  return out


def versus_random(
  chosen: Sequence[float],
  random: np.ndarray,
  top: np.ndarray | None = None,
  resamples: int = 2000,
  seed: int = 0,
  level: float = 0.95,
) -> dict[str, float | dict[str, float]]:
  """How the search's chosen net compares with random nets of equal cost, trained the same way.

  `chosen`: its accuracies (seeds,); `random`: (nets, seeds); `top`: the search's top-k (k, seeds),
  optional. Intervals are percentile bootstraps over random nets and seeds within each net.
  Returns the chosen net's mean, its rank (1 = best) and percentile among the random nets' means, the
  probability that a training of it beats one of a random net, and the mean accuracy of the top-k
  against k random nets (the difference of their means).
  """
  chosen, random = np.asarray(chosen, np.float64)[None], np.asarray(random, np.float64)
  groups = [chosen, random] + ([np.asarray(top, np.float64)] if top is not None else [])

  def statistics(tables: list[np.ndarray]) -> dict[str, float]:
    c, r = tables[0][0], tables[1]
    means = r.mean(1)
    stats = {'percentile': percentile_of(c.mean(), means), 'beat_probability': beat_probability(c, r)}
    if top is not None:
      stats['top_minus_random'] = float(tables[2].mean() - means.mean())
    return stats

  point = statistics(groups)
  rng = np.random.default_rng(seed)
  draws = [statistics(_bootstrap_nets(groups, rng)) for _ in range(resamples)]
  report: dict[str, float | dict[str, float]] = {
    'chosen_mean': float(chosen.mean()),
    'random_mean': float(random.mean()),
    'random_median': float(np.median(random.mean(1))),
    'rank': int(1 + np.sum(random.mean(1) > chosen.mean())),
    'num_random': len(random),
  }
  if top is not None:
    report['top_mean'] = float(np.mean(top))
  for key, value in point.items():
    values = np.array([d[key] for d in draws])
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)]) if resamples else (np.nan, np.nan)
    report[key] = {'value': value, 'low': float(low), 'high': float(high)}
  return report
