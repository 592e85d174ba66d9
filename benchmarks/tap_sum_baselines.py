"""Earlier formulations of the depthwise kernel gradient (`layers.tap_sums`), for same-run comparisons.

`layers.tap_sums` now sums every tap's products in one variadic reduction per chunk of examples.
Before, each of the k*k taps had its own reduction, and XLA:CPU copied each tap's window out before
reducing it; `per_tap()` puts that formulation back while a step is traced.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from unittest import mock

import jax
from jax import lax
import jax.numpy as jnp

from dna_jax.models import layers


def per_tap_sums(padded: jax.Array, grad: jax.Array, k: int, stride: int, out_size: tuple[int, int]) -> jax.Array:
  """`layers.tap_sums` as it was: one reduction per tap, over chunks of TAP_SUM_CHUNK_BYTES."""

  def sums(padded_chunk: jax.Array, grad_chunk: jax.Array) -> jax.Array:
    windows = layers.strided_windows(padded_chunk, k, stride, out_size)
    return jnp.stack([jnp.sum(w * grad_chunk, axis=(0, 1, 2), dtype=jnp.float32) for _, w in windows])

  examples = grad.shape[0]
  per_example = max(1, grad[0].size * grad.dtype.itemsize)
  chunk = max(
    [d for d in range(1, examples + 1) if examples % d == 0 and d * per_example <= layers.TAP_SUM_CHUNK_BYTES] or [1]
  )
  if chunk == examples:
    return sums(padded, grad)
  padded_chunks, grad_chunks = (x.reshape(examples // chunk, chunk, *x.shape[1:]) for x in (padded, grad))
  start = jnp.zeros_like(grad, jnp.float32, shape=(k * k, grad.shape[-1]))
  total, _ = lax.scan(lambda acc, xs: (acc + sums(*xs), None), start, (padded_chunks, grad_chunks))
  return total


@contextlib.contextmanager
def per_tap() -> Iterator[None]:
  """While active, steps traced differentiate depthwise convs with `per_tap_sums` (read while tracing)."""
  with mock.patch.object(layers, 'tap_sums', per_tap_sums):
    yield
