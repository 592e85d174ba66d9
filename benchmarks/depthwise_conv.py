"""The CPU depthwise convolution: forward + backward of its implementations, compile and run time.

  PYTHONPATH=. python benchmarks/depthwise_conv.py [--batch 8] [--size 32] [--channels 96] [--steps 5]

For k3/k5/k7 at strides 1 and 2 (TF-SAME padding): jit(value_and_grad) of sum(sin(conv(x, w))) with
respect to both x and w, for
  native:    XLA's grouped convolution (`feature_group_count = C`), what TPU and GPU use;
  autodiff:  the shift-and-add sum of k*k strided windows, differentiated by JAX (`layers.shift_add`);
  hand:      the same forward with its hand-written gradient (`layers.shift_add_vjp`), whose kernel
             gradient sums the batch a few examples at a time, all k*k taps in one reduction
             (`layers.tap_sums`);
  hand_per_tap: the same with one reduction per tap (as before; `tap_sum_baselines.per_tap`);
  hand_whole_batch: one reduction per tap over the whole batch at once (before that);
  shift_add: what the supernet, child nets and teacher use on CPU (`layers.depthwise_conv(..., 'shift_add')`,
             now the hand-written gradient at every kernel and stride).
Prints compile seconds, the fastest of --steps runs after a warm-up, and the largest relative
difference of values and gradients from `native`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import contextlib
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import tap_sum_baselines
from dna_jax import host_memory
from dna_jax.models import layers


def padded_shift_add(function):
  """`function(padded, kernel, stride, out_size)` as a TF-SAME depthwise conv of (x, kernel, stride)."""

  def conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    padded, out_size = layers.pad_for_shift_add(x, kernel.shape[0], stride, 'tf_same')
    return function(padded, kernel, stride, out_size)

  return conv


@contextlib.contextmanager
def whole_batch_per_tap() -> Iterator[None]:
  with tap_sum_baselines.per_tap(), mock.patch.object(layers, 'TAP_SUM_CHUNK_BYTES', 2**62):  # read while tracing
    yield


IMPLEMENTATIONS = {
  'native': (lambda x, w, s: layers.depthwise_conv(x, w, s, 'tf_same', 'native'), contextlib.nullcontext),
  'autodiff': (padded_shift_add(layers.shift_add), contextlib.nullcontext),
  'hand': (padded_shift_add(layers.shift_add_vjp), contextlib.nullcontext),
  'hand_per_tap': (padded_shift_add(layers.shift_add_vjp), tap_sum_baselines.per_tap),
  'hand_whole_batch': (padded_shift_add(layers.shift_add_vjp), whole_batch_per_tap),
  'shift_add': (lambda x, w, s: layers.depthwise_conv(x, w, s, 'tf_same', 'shift_add'), contextlib.nullcontext),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=96)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, args.channels))
  print(
    f'device {jax.devices()[0].platform}; x {tuple(x.shape)}; load average at start '
    + '/'.join(f'{v:.1f}' for v in os.getloadavg())
  )
  print('| kernel | stride | implementation | compile s | fwd+bwd ms | max rel. difference from native |')
  print('|---|---|---|---|---|---|')
  for k in (3, 5, 7):
    for stride in (1, 2):
      w = jax.random.normal(jax.random.key(1), (k, k, 1, args.channels))
      reference = None
      for name, (conv, tracing) in IMPLEMENTATIONS.items():
        loss = lambda x, w, conv=conv, stride=stride: jnp.sum(jnp.sin(conv(x, w, stride)))
        start = time.perf_counter()
        with tracing():
          compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile()
        compile_s = time.perf_counter() - start
        result = jax.block_until_ready(compiled(x, w))
        times = []
        for _ in range(args.steps):
          start = time.perf_counter()
          jax.block_until_ready(compiled(x, w))
          times.append(time.perf_counter() - start)
        reference = result if reference is None else reference
        difference = max(
          float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
          for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference))
        )
        print(f'| {k} | {stride} | {name} | {compile_s:.2f} | {1e3 * min(times):.1f} | {difference:.1e} |', flush=True)


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  main()
