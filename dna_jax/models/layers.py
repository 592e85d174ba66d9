"""Building blocks shared by the teacher, the distillation supernet and the child net.

Written once: stem, depthwise conv, squeeze-excitation, MBConv, head. Padding and
BatchNorm epsilon are options (`Conventions`), not constants: the Keras teacher
needs TF-SAME padding and eps 1e-3, the authors' PyTorch nets symmetric padding
and eps 1e-5. 1x1 convolutions are `nn.Dense` over the channel axis (a matmul;
faster than a 1x1 `lax.conv` on CPU and identical in result).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from dna_jax import space as space_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Conventions:
  """Numerical conventions of a family of checkpoints.

  padding: 'tf_same' (TensorFlow/Keras SAME) or 'symmetric' (PyTorch, ((s-1)+(k-1))//2 per side).
  depthwise: 'native' (grouped convolution; right on TPU/GPU), 'shift_add' (sum of k*k shifted
    slices; much faster on XLA:CPU, whose grouped-conv gradient is very slow), or 'auto'
    (shift_add on CPU, native elsewhere).
  bn_momentum: flax convention (new = m * old + (1 - m) * batch); PyTorch's 0.1 is 0.9 here.
  dtype: activation dtype (bfloat16 for mixed precision); parameters stay float32.
  """

  padding: str = 'tf_same'
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.99
  depthwise: str = 'auto'
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.padding not in ('tf_same', 'symmetric'):
      raise ValueError(f"padding must be 'tf_same' or 'symmetric', got {self.padding!r}")
    if self.depthwise not in ('auto', 'native', 'shift_add'):
      raise ValueError(f"depthwise must be 'auto', 'native' or 'shift_add', got {self.depthwise!r}")


KERAS = Conventions()
ACTIVATION_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # Conventions.dtype by name
TORCH = Conventions(padding='symmetric', bn_epsilon=1e-5, bn_momentum=0.9)


def conventions_from_config(config: Any) -> Conventions:
  """Conventions from a config section with padding/bn_epsilon/bn_momentum/depthwise/dtype."""
  dtype = config.get('dtype', 'float32')
  if dtype not in ACTIVATION_DTYPES:
    raise ValueError(f'dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {dtype!r}')
  return Conventions(
    padding=config.get('padding', 'tf_same'),
    bn_epsilon=float(config.get('bn_epsilon', 1e-3)),
    bn_momentum=float(config.get('bn_momentum', 0.99)),
    depthwise=config.get('depthwise', 'auto'),
    dtype=ACTIVATION_DTYPES[dtype],
  )


def depthwise_conv(x: Array, kernel: Array, stride: int, padding: str, impl: str) -> Array:
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel."""
  k = kernel.shape[0]
  pads = [
    space_lib.conv_padding(x.shape[1], k, stride, padding),
    space_lib.conv_padding(x.shape[2], k, stride, padding),
  ]
  if impl == 'auto':
    impl = 'shift_add' if jax.default_backend() == 'cpu' else 'native'
  if impl == 'native':
    return lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1]
    )
  padded, out_size = pad_for_shift_add(x, k, stride, padding)
  # The hand-written gradient, faster than JAX's own for every kernel and stride since its kernel
  # gradient sums a few examples at a time (benchmarks/depthwise_conv.py, 8x32x32x96 fwd+bwd on a 2-core
  # CPU: k3/k5/k7 at stride 1 69/53/94 -> 18/28/40 ms, at stride 2 20/12/37 -> 6/9/13 ms).
  return shift_add_vjp(padded, kernel, stride, out_size)


def pad_for_shift_add(x: Array, k: int, stride: int, padding: str) -> tuple[Array, tuple[int, int]]:
  """NHWC `x` zero-padded for a k x k depthwise conv, and the conv's output (height, width)."""
  pads = [space_lib.conv_padding(x.shape[a], k, stride, padding) for a in (1, 2)]
  out_size = tuple((x.shape[a] + sum(p) - k) // stride + 1 for a, p in zip((1, 2), pads))
  return jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)]), out_size


def strided_windows(padded: Array, k: int, stride: int, out_size: tuple[int, int]):
  """((i, j), the strided window of `padded` that kernel tap (i, j) multiplies), for every tap."""
  out_h, out_w = out_size
  for i in range(k):
    for j in range(k):
      end = (padded.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, padded.shape[3])
      yield (i, j), lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))


def shift_add(padded: Array, kernel: Array, stride: int, out_size: tuple[int, int]) -> Array:
  """Depthwise conv of a padded input: the sum of k*k shifted, strided windows times the taps."""
  taps = [window * kernel[i, j, 0] for (i, j), window in strided_windows(padded, kernel.shape[0], stride, out_size)]
  return functools.reduce(jnp.add, taps)


# Autodiff transposes each strided window into a full-size (interior-)padded array; the hand-written
# gradient pads the output gradient once and runs one more shift-and-add over it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shift_add_vjp(padded: Array, kernel: Array, stride: int, out_size: tuple[int, int]) -> Array:
  """`shift_add` with its hand-written gradient."""
  return shift_add(padded, kernel, stride, out_size)


def _shift_add_forward(padded, kernel, stride, out_size):
  return shift_add(padded, kernel, stride, out_size), (padded, kernel)


def _shift_add_backward(stride, out_size, residuals, grad):
  padded, kernel = residuals
  k = kernel.shape[0]
  # d(padded) is the full correlation of the stride-dilated output gradient with the flipped kernel:
  # itself a stride-1 shift-and-add over the gradient, dilated and padded to padded's size + k - 1.
  spare = [padded.shape[1 + a] - (out_size[a] - 1) * stride - k for a in (0, 1)]
  dilated = lax.pad(
    grad,
    jnp.zeros((), grad.dtype),
    [(0, 0, 0), (k - 1, k - 1 + spare[0], stride - 1), (k - 1, k - 1 + spare[1], stride - 1), (0, 0, 0)],
  )
  d_padded = shift_add(dilated, kernel[::-1, ::-1], 1, padded.shape[1:3])
  d_kernel = tap_sums(padded, grad, k, stride, out_size)
  return d_padded, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


shift_add_vjp.defvjp(_shift_add_forward, _shift_add_backward)


# Summed over the whole batch at once, XLA:CPU writes each tap's window out in full before reducing it
# (a k*k-fold copy of the input). Summed a few examples at a time, the windows stay in cache: 1.25x and
# 1.51x faster training steps of the demo's teacher and chosen net (benchmarks/train_step.py, 2-core CPU).
TAP_SUM_CHUNK_BYTES = 512 * 1024


def sum_example_chunks(sums: Callable[[Array, Array], Array], padded: Array, grad: Array, k: int) -> Array:
  """`sums(padded_chunk, grad_chunk)` ((k*k, C) float32) added up over chunks of examples whose output
  gradient spans about TAP_SUM_CHUNK_BYTES (one chunk when the whole batch fits)."""
  examples = grad.shape[0]
  per_example = max(1, grad[0].size * grad.dtype.itemsize)
  chunk = max(
    [d for d in range(1, examples + 1) if examples % d == 0 and d * per_example <= TAP_SUM_CHUNK_BYTES] or [1]
  )
  if chunk == examples:
    return sums(padded, grad)
  padded_chunks, grad_chunks = (x.reshape(examples // chunk, chunk, *x.shape[1:]) for x in (padded, grad))
  # zeros_like(grad): under shard_map the carry varies over the data axis, as the body's sums do.
  start = jnp.zeros_like(grad, jnp.float32, shape=(k * k, grad.shape[-1]))
  total, _ = lax.scan(lambda acc, xs: (acc + sums(*xs), None), start, (padded_chunks, grad_chunks))
  return total


def tap_sums(padded: Array, grad: Array, k: int, stride: int, out_size: tuple[int, int]) -> Array:
  """(k*k, C) float32: for each kernel tap, its window of `padded` times `grad`, summed over N, H, W.

  The batch is summed in chunks of examples whose output gradient spans about TAP_SUM_CHUNK_BYTES,
  every tap of a chunk in one variadic reduction.
  """

  def sums(padded_chunk: Array, grad_chunk: Array) -> Array:
    products = tuple(
      (w * grad_chunk).astype(jnp.float32) for _, w in strided_windows(padded_chunk, k, stride, out_size)
    )
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in products)
    # One reduction with k*k results, not one per tap: XLA:CPU then reads each chunk once, with every
    # window and product fused in, instead of copying each tap's window out first. Same-run on a 2-core
    # Xeon: the demo's distillation step 1.20x faster and compiled 1.38x faster (80.4 -> 58.1 s), the
    # chosen child net's training step 1.16x (benchmarks/distill_step.py, train_step.py). Only on chunks
    # that fit in cache: over a whole large array XLA:CPU's variadic reduction reads it with strides,
    # 8-36x slower than its ordinary reductions (mean and mean square of 8x112x112x96 and larger). Where
    # one example's gradient alone passes TAP_SUM_CHUNK_BYTES it is still one chunk: at ImageNet shapes
    # 2.3-3.3x faster than one reduction per tap, except 112 px x 96 channels, k3, stride 2 (1.3x slower).
    totals = lax.reduce(products, zeros, lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (0, 1, 2))
    return jnp.stack(totals)

  return sum_example_chunks(sums, padded, grad, k)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, no bias; param 'kernel' of shape (k, k, 1, C)."""

  kernel_size: int
  stride: int = 1
  conventions: Conventions = KERAS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    kernel = self.param(
      'kernel',
      nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
      (self.kernel_size, self.kernel_size, 1, channels),
    )
    dtype = self.conventions.dtype
    return depthwise_conv(
      x.astype(dtype), kernel.astype(dtype), self.stride, self.conventions.padding, self.conventions.depthwise
    )


def batch_norm(conventions: Conventions, train: bool, name: str, axis_name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=conventions.bn_momentum,
    epsilon=conventions.bn_epsilon,
    dtype=conventions.dtype,
    axis_name=axis_name,
    name=name,
  )


def example_mask(mask: Array | None, x: Array) -> Array | None:
  """A per-example mask (N,) as BatchNorm's statistics mask for NHWC `x`: padded examples leave the statistics alone."""
  return None if mask is None else (mask.reshape((-1,) + (1,) * (x.ndim - 1)) > 0)


def channels_matmul(
  x: Array, kernel: Array, dimension_numbers: Any, precision: Any = None, preferred_element_type: Any = None
) -> Array:
  """Dense's `lax.dot_general` (x's last axis against the kernel's first); on CPU as one 2-D matmul.

  Differentiated as an (N, H, W, C) contraction, the kernel's gradient contracts three axes, and
  XLA:CPU wrote the output gradient out transposed before the matmul; with the rows flattened first it
  is one matmul over the rows. Same-run on a 2-core Xeon: the demo teacher's training step 1.22x, the
  chosen child net's 1.18x and the demo's distillation step 1.15x faster (benchmarks/train_step.py,
  distill_step.py --matmul_baseline).
  """
  dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=preferred_element_type)
  if jax.default_backend() != 'cpu' or x.ndim == 2 or dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    return dot(x, kernel, dimension_numbers)
  y = dot(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())))
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def pointwise(features: int, name: str, conventions: Conventions, use_bias: bool = False) -> nn.Dense:
  """A 1x1 convolution as a Dense layer over channels; kernel (in, out)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=conventions.dtype,
    name=name,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    dot_general=channels_matmul,
  )


class SqueezeExcite(nn.Module):
  """Global mean -> 1x1 conv (bias) -> swish -> 1x1 conv (bias) -> sigmoid gate."""

  squeeze: int
  conventions: Conventions = KERAS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # On the pooled (N, C) vector: rank-2 matmuls export cleanly to TFLite.
    pooled = jnp.mean(x, axis=(1, 2))
    scale = pointwise(self.squeeze, 'reduce', self.conventions, use_bias=True)(pooled)
    scale = pointwise(x.shape[-1], 'expand', self.conventions, use_bias=True)(nn.swish(scale))
    return x * nn.sigmoid(scale)[:, None, None, :]


def drop_connect(x: Array, rate: float, deterministic: bool, module: nn.Module) -> Array:
  """Per-example stochastic depth on a residual branch ('dropout' rng)."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand, BN, swish] -> kxk depthwise, BN, swish -> SE -> 1x1 project, BN.

  expansion 1 skips the expand conv (EfficientNet stage 1, DNA's depthwise-separable block).
  The residual is used iff stride 1 and in == out channels. SE squeezes to 0.25 of the input channels.
  """

  out_channels: int
  expansion: int
  kernel_size: int
  stride: int = 1
  se_ratio: float = 0.25
  drop_connect_rate: float = 0.0
  conventions: Conventions = KERAS
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """`mask` (N,): examples whose BatchNorm statistics count in training mode (default: all)."""
    conv = self.conventions
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = x.astype(conv.dtype)
    if self.expansion != 1:
      y = pointwise(hidden, 'expand_conv', conv)(y)
      y = nn.swish(batch_norm(conv, train, 'expand_bn', self.bn_axis_name)(y, mask=example_mask(mask, y)))
    y = DepthwiseConv(self.kernel_size, self.stride, conv, name='dwconv')(y)
    y = nn.swish(batch_norm(conv, train, 'dw_bn', self.bn_axis_name)(y, mask=example_mask(mask, y)))
    if self.se_ratio:
      y = SqueezeExcite(space_lib.se_width(in_channels, self.se_ratio), conv, name='se')(y)
    y = pointwise(self.out_channels, 'project_conv', conv)(y)
    y = batch_norm(conv, train, 'project_bn', self.bn_axis_name)(y, mask=example_mask(mask, y))
    if self.stride == 1 and in_channels == self.out_channels:
      y = drop_connect(y, self.drop_connect_rate, not train, self) + x.astype(y.dtype)
    return y


class Stem(nn.Module):
  """3x3 stride-2 conv (no bias) -> BN -> swish."""

  width: int
  stride: int = 2
  conventions: Conventions = KERAS
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    conv = self.conventions
    pads = [
      space_lib.conv_padding(x.shape[1], 3, self.stride, conv.padding),
      space_lib.conv_padding(x.shape[2], 3, self.stride, conv.padding),
    ]
    y = nn.Conv(
      self.width,
      (3, 3),
      (self.stride, self.stride),
      padding=pads,
      use_bias=False,
      dtype=conv.dtype,
      name='conv',
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    )(x.astype(conv.dtype))
    return nn.swish(batch_norm(conv, train, 'bn', self.bn_axis_name)(y, mask=example_mask(mask, y)))


class Head(nn.Module):
  """1x1 conv (no bias) -> BN -> swish -> global mean -> dropout -> dense classifier.

  Returns (logits, pre_logits).
  """

  width: int
  num_classes: int
  dropout_rate: float = 0.0
  conventions: Conventions = KERAS
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    conv = self.conventions
    y = pointwise(self.width, 'conv', conv)(x.astype(conv.dtype))
    y = nn.swish(batch_norm(conv, train, 'bn', self.bn_axis_name)(y))
    pre_logits = jnp.mean(y, axis=(1, 2))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(pre_logits)
    logits = nn.Dense(
      self.num_classes,
      dtype=conv.dtype,
      name='classifier',
      kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform'),
    )(y)
    return logits.astype(jnp.float32), pre_logits
