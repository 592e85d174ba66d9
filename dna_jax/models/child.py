"""The standalone child network of an architecture (what DNA retrains and deploys)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import run_once
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
  return run_once.jit(lambda r: model.init(r, dummy, train=False))(rng)


def transfer_supernet_weights(
  child_variables: Mapping[str, Any], arch: space_lib.Architecture, cells: list[Mapping[str, Any]]
) -> tuple[dict[str, Any], int, int]:
  """Child variables with every leaf of the chosen supernet paths copied where the shapes agree.

  `cells[k]` holds the variables of the supernet cell chosen for block k (layer l, op o under
  'layer{l}/{op name}'; block 1 also 'stem' and 'ds'). Leaves whose shape differs (the first layer of a
  block reads the teacher's width in the supernet, the last one writes it) keep the child's
  initialisation. Returns (variables, leaves copied, leaves kept).
  """
  sources = {}
  for k, choice in enumerate(arch.blocks[: len(cells)]):
    if k == 0:
      sources['stem'], sources['ds'] = ('stem',), ('ds',)
    for l, op_id in enumerate(choice.ops):
      sources[f'block{k + 1}_layer{l}'] = (k, f'layer{l}', space_lib.OP_NAMES[op_id])
  copied = kept = 0
  result = {}
  for collection, tree in child_variables.items():
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for key, value in flat.items():
      source = sources.get(key[0])
      found = None
      if source is not None:
        block, *path = (0, *source) if source[0] in ('stem', 'ds') else source
        node = cells[block].get(collection, {})
        for part in (*path, *key[1:]):
          node = node.get(part) if isinstance(node, Mapping) else None
        found = node
      if found is not None and tuple(np.shape(found)) == tuple(np.shape(value)):
        flat[key] = jnp.asarray(found, dtype=value.dtype)
        copied += 1
      else:
        kept += 1
    result[collection] = flax.traverse_util.unflatten_dict(flat)
  return result, copied, kept


def child_for_training(
  arch: space_lib.Architecture, num_classes: int, config: Any, bn_axis_name: str | None
) -> ChildNet:
  """The child net as a run's config trains it: conventions from config.model, dropout and drop-connect
  from config.retrain, stem stride from config.space; BatchNorm statistics over `bn_axis_name`, or per
  device with config.model.bn_sync='device'."""
  if config.model.bn_sync not in ('global', 'device'):
    raise ValueError(f"model.bn_sync={config.model.bn_sync!r}; valid: 'global', 'device'")
  rc = config.retrain
  return ChildNet(
    arch,
    num_classes,
    rc.dropout_rate,
    rc.drop_connect_rate,
    config.space.stem_stride,
    layers.conventions_from_config(config.model),
    bn_axis_name=bn_axis_name if config.model.bn_sync == 'global' else None,
  )
