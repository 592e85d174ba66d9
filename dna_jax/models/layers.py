"""Building blocks shared by the teacher, the distillation supernet and the child net.

Written once: stem, depthwise conv, squeeze-excitation, MBConv, head. Padding and
BatchNorm epsilon are options (`Conventions`), not constants: the Keras teacher
needs TF-SAME padding and eps 1e-3, the authors' PyTorch nets symmetric padding
and eps 1e-5. 1x1 convolutions are `nn.Dense` over the channel axis (a matmul;
faster than a 1x1 `lax.conv` on CPU and identical in result).
"""

from __future__ import annotations

import dataclasses
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
TORCH = Conventions(padding='symmetric', bn_epsilon=1e-5, bn_momentum=0.9)


def conventions_from_config(config: Any) -> Conventions:
  """Conventions from a config section with padding/bn_epsilon/bn_momentum/depthwise/dtype."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  dtype = config.get('dtype', 'float32')
  if dtype not in dtypes:
    raise ValueError(f'dtype must be one of {sorted(dtypes)}, got {dtype!r}')
  return Conventions(
    padding=config.get('padding', 'tf_same'),
    bn_epsilon=float(config.get('bn_epsilon', 1e-3)),
    bn_momentum=float(config.get('bn_momentum', 0.99)),
    depthwise=config.get('depthwise', 'auto'),
    dtype=dtypes[dtype],
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
  out_h = (x.shape[1] + sum(pads[0]) - k) // stride + 1
  out_w = (x.shape[2] + sum(pads[1]) - k) // stride + 1
  padded = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  out = None
  for i in range(k):
    for j in range(k):
      window = lax.slice(
        padded,
        (0, i, j, 0),
        (padded.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, padded.shape[3]),
        (1, stride, stride, 1),
      )
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


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


def pointwise(features: int, name: str, conventions: Conventions, use_bias: bool = False) -> nn.Dense:
  """A 1x1 convolution as a Dense layer over channels; kernel (in, out)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=conventions.dtype,
    name=name,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
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
