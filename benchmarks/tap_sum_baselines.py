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
import jax.numpy as jnp

from dna_jax.models import layers


def per_tap_sums(padded: jax.Array, grad: jax.Array, k: int, stride: int, out_size: tuple[int, int]) -> jax.Array:
  """`layers.tap_sums` as it was: one reduction per tap, in the same chunks of examples."""

  def sums(padded_chunk: jax.Array, grad_chunk: jax.Array) -> jax.Array:
    windows = layers.strided_windows(padded_chunk, k, stride, out_size)
    return jnp.stack([jnp.sum(w * grad_chunk, axis=(0, 1, 2), dtype=jnp.float32) for _, w in windows])

  return layers.sum_example_chunks(sums, padded, grad, k)


@contextlib.contextmanager
def per_tap() -> Iterator[None]:
  """While active, steps traced differentiate depthwise convs with `per_tap_sums` (read while tracing)."""
  with mock.patch.object(layers, 'tap_sums', per_tap_sums):
    yield
