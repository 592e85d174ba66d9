"""Rank statistics for ranking studies (NumPy only): Kendall tau-b, Spearman rho, bootstrap intervals.

Vectorised along the last axis, so that thousands of bootstrap resamples are one call; ties are
handled as scipy.stats does (tau-b, average ranks), and a statistic that is undefined (one side
constant) is NaN.
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
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}')
  value = float(statistic(x, y))
  low = high = float('nan')
  if resamples > 0:
    index = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    values = statistic(x[index], y[index])
    values = values[np.isfinite(values)]
    if len(values):
      low, high = (float(v) for v in np.percentile(values, [50 * (1 - level), 50 * (1 + level)]))
  return {'value': value, 'low': low, 'high': high}


def correlations(
  quality: Sequence[float], accuracy: Sequence[float], resamples: int, seed: int, level: float = 0.95
) -> dict[str, dict[str, float]]:
  """Kendall tau and Spearman rho of `quality` (higher = predicted better) against accuracy."""
  return {
    'kendall_tau': with_interval(kendall_tau, quality, accuracy, resamples, seed, level),
    'spearman_rho': with_interval(spearman_rho, quality, accuracy, resamples, seed, level),
  }
