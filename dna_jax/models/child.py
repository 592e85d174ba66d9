"""The standalone child network of an architecture (what DNA retrains and deploys)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from dna_jax import space as space_lib
from dna_jax.models import layers

Array = jax.Array


def layer_drop_rates(arch: space_lib.Architecture, drop_connect_rate: float) -> list[float]:
  """Drop-connect rate of every searched layer: rate * index / count, index 1.. after the DS block."""
  count = 1 + sum(b.cell.layers for b in arch.blocks)
  return [drop_connect_rate * i / count for i in range(1, count)]


class ChildNet(nn.Module):
  """Stem -> depthwise-separable block -> searched blocks -> 1x1 conv head -> classifier.

  Returns `(logits, features)`; `features` holds 'stem', 'ds', 'block1'..'blockN' (block outputs,
  the same kind of thing as the teacher's) and 'pre_logits'.
  """

  arch: space_lib.Architecture
  num_classes: int = 1000
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  stem_stride: int = 2
  conventions: layers.Conventions = layers.KERAS
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    conv, axis = self.conventions, self.bn_axis_name
    features = {}
    x = layers.Stem(self.arch.stem_width, self.stem_stride, conv, axis, name='stem')(images, train)
    features['stem'] = x
    x = layers.MBConv(self.arch.ds_width, 1, 3, 1, conventions=conv, bn_axis_name=axis, name='ds')(x, train)
    features['ds'] = x
    rates = iter(layer_drop_rates(self.arch, self.drop_connect_rate))
    for k, choice in enumerate(self.arch.blocks, start=1):
      for l, op_id in enumerate(choice.ops):
        op = space_lib.OPS[op_id]
        x = layers.MBConv(
          choice.cell.width,
          op.expansion,
          op.kernel,
          choice.cell.stride if l == 0 else 1,
          drop_connect_rate=next(rates),
          conventions=conv,
          bn_axis_name=axis,
          name=f'block{k}_layer{l}',
        )(x, train)
      features[f'block{k}'] = x
    logits, features['pre_logits'] = layers.Head(
      self.arch.head_width, self.num_classes, self.dropout_rate, conv, axis, name='head'
    )(x, train)
    return logits, features


def init_child(model: ChildNet, rng: Any, image_size: int) -> dict[str, Any]:
  """Variables of `model` for square `image_size` inputs (shape-only init under jit)."""
  dummy = jax.numpy.zeros((1, image_size, image_size, 3), jax.numpy.float32)
  return jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
