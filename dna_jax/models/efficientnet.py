"""EfficientNet-B0..B7 (the DNA teacher) with every stage output tapped.

The network is that of `keras.applications.EfficientNetB0..B7`, layer for layer, so
that Keras ImageNet weights map onto it one to one (see `dna_jax.convert_teacher`):
TF-SAME padding, BatchNorm eps 1e-3, swish, SE squeezing to 0.25 of each layer's
input channels, drop-connect growing linearly with the layer index (off at
inference), dropout before the classifier. Widths are scaled with `round_filters`
(divisor 8, never more than 10% down) and depths with `round_repeats` (ceil).

DNA cuts the teacher after its stages: the features are 'stem', 'stage1' and
'block1'..'block{S-1}', the outputs of stages 2..S (for B0..B7: the six distillation
targets, 56x56x48 ... 7x7x640 for B7 at 224 px).

Input convention (`keras_input=True`, as in the B0..B7 aliases): the model takes
0..255 RGB pixels and normalises inside exactly as the Keras model does:
  x = x * (1/255);  x = (x - mean) / max(sqrt(variance), 1e-7);  x = x * rescale
`mean`, `variance` (the Keras Normalization layer's weights) and `rescale` (Keras's extra
per-channel rescale for ImageNet weights, 1/sqrt(0.229, 0.224, 0.225); ones otherwise)
live in the non-trainable variable collection 'normalization'. With `keras_input=False`
the model takes already normalised images and has no such collection.

Parameter names: 'stem/{conv,bn}', 'stage{i}_layer{j}/...' (layers.MBConv names; Keras
'block{i}{a,b,...}_...'), 'head/{conv,bn,classifier}'.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dna_jax import images as images_lib
from dna_jax.models import layers

Array = jax.Array


class Stage(NamedTuple):
  """One EfficientNet stage before scaling: `repeats` MBConv layers, the first with `stride`."""

  kernel: int
  expansion: int
  width: int
  stride: int
  repeats: int


B0_STAGES: tuple[Stage, ...] = (
  Stage(3, 1, 16, 1, 1),
  Stage(3, 6, 24, 2, 2),
  Stage(5, 6, 40, 2, 2),
  Stage(3, 6, 80, 2, 3),
  Stage(5, 6, 112, 1, 3),
  Stage(5, 6, 192, 2, 4),
  Stage(3, 6, 320, 1, 1),
)

# A 4-stage net for 32x32 demo images (3 DNA blocks: 16 s2, 24 s2, 32 s1).
TINY_STAGES: tuple[Stage, ...] = (
  Stage(3, 1, 8, 1, 1),
  Stage(3, 4, 16, 2, 2),
  Stage(5, 4, 24, 2, 2),
  Stage(3, 4, 32, 1, 1),
)
# The same widths with deeper DNA blocks (3, 3, 2 layers): at least as deep as the demo space's deepest
# cell in every block, so that no student cell imitates a teacher block shallower than itself.
TINY_DEEP_STAGES: tuple[Stage, ...] = (
  Stage(3, 1, 8, 1, 1),
  Stage(3, 4, 16, 2, 3),
  Stage(5, 4, 24, 2, 3),
  Stage(3, 4, 32, 1, 2),
)


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
  """Keras's width scaling: nearest multiple of `divisor`, at least `divisor`, never 10% below."""
  scaled = filters * width_coefficient
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Keras's depth scaling: ceil(depth_coefficient * repeats)."""
  return math.ceil(depth_coefficient * repeats)


class EfficientNet(nn.Module):
  """EfficientNet returning `(logits, features)`.

  `features`: 'stem', 'stage1', 'block1'..'block{S-1}' (outputs of stages 2..S) and, when the
  head runs, 'pre_logits'. With `up_to=k` only the stem, stage 1 and DNA blocks 1..k run;
  logits are then None.
  """

  stages: tuple[Stage, ...] = B0_STAGES
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  stem_width: int = 32
  head_width: int = 1280
  stem_stride: int = 2
  num_classes: int = 1000
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  depth_divisor: int = 8
  conventions: layers.Conventions = layers.KERAS
  keras_input: bool = False
  up_to: int | None = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, images: Array, train: bool = False, mask: Array | None = None
  ) -> tuple[Array | None, dict[str, Array]]:
    """`mask` (N,): in training mode, only these examples count in BatchNorm statistics (padding does not)."""
    validate(self, images.shape)
    conv, axis = self.conventions, self.bn_axis_name
    x = images
    if self.keras_input:
      x = self._normalize(x)
    features = {}
    x = layers.Stem(self.scaled_width(self.stem_width), self.stem_stride, conv, axis, name='stem')(x, train, mask)
    features['stem'] = x
    last_stage = len(self.stages) if self.up_to is None else self.up_to + 1
    total_layers = sum(stage.repeats for stage in scaled_stages(self))
    index = 0
    for i, stage in enumerate(scaled_stages(self), start=1):
      if i > last_stage:
        break
      for j in range(stage.repeats):
        x = layers.MBConv(
          stage.width,
          stage.expansion,
          stage.kernel,
          stage.stride if j == 0 else 1,
          drop_connect_rate=self.drop_connect_rate * index / total_layers,
          conventions=conv,
          bn_axis_name=axis,
          name=f'stage{i}_layer{j}',
        )(x, train, mask)
        index += 1
      features['stage1' if i == 1 else f'block{i - 1}'] = x
    if self.up_to is not None:
      return None, features
    logits, features['pre_logits'] = layers.Head(
      self.scaled_width(self.head_width), self.num_classes, self.dropout_rate, conv, axis, name='head'
    )(x, train)
    return logits, features

  def scaled_width(self, width: int) -> int:
    return round_filters(width, self.width_coefficient, self.depth_divisor)

  def _normalize(self, x: Array) -> Array:
    """Keras's Rescaling(1/255) -> Normalization -> (ImageNet weights only) Rescaling, in float32."""
    mean = self.variable('normalization', 'mean', lambda: jnp.array(images_lib.IMAGENET_MEAN, jnp.float32))
    variance = self.variable(
      'normalization', 'variance', lambda: jnp.square(jnp.array(images_lib.IMAGENET_STD, jnp.float32))
    )
    rescale = self.variable('normalization', 'rescale', lambda: jnp.ones((3,), jnp.float32))
    x = x.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    x = (x - mean.value) / jnp.maximum(jnp.sqrt(variance.value), jnp.float32(1e-7))
    return x * rescale.value


def scaled_stages(model: EfficientNet) -> tuple[Stage, ...]:
  """The stage table after width and depth scaling (actual channels and layer counts)."""
  return tuple(
    stage._replace(width=model.scaled_width(stage.width), repeats=round_repeats(stage.repeats, model.depth_coefficient))
    for stage in model.stages
  )


def num_blocks(model: EfficientNet) -> int:
  """Number of DNA blocks (stages 2..S)."""
  return len(model.stages) - 1


def block_widths(model: EfficientNet) -> tuple[int, ...]:
  """Output channels of DNA blocks 1..S-1 (B7: 48, 80, 160, 224, 384, 640)."""
  return tuple(stage.width for stage in scaled_stages(model)[1:])


def block_strides(model: EfficientNet) -> tuple[int, ...]:
  """Stride of DNA blocks 1..S-1 (B0..B7: 2, 2, 2, 1, 2, 1)."""
  return tuple(stage.stride for stage in model.stages[1:])


def validate(model: EfficientNet, shape: tuple[int, ...]) -> None:
  """Clear errors for a bad configuration or input shape (raised while tracing, before compiling)."""
  if len(model.stages) < 2:
    raise ValueError(f'EfficientNet needs at least 2 stages (stem stage + 1 DNA block), got {len(model.stages)}')
  for k, stage in enumerate(model.stages, start=1):
    if stage.stride not in (1, 2) or min(stage.kernel, stage.expansion, stage.width, stage.repeats) < 1:
      raise ValueError(f'stage {k} {stage}: need stride 1 or 2 and positive kernel/expansion/width/repeats')
  if model.stem_stride not in (1, 2):
    raise ValueError(f'stem_stride must be 1 or 2, got {model.stem_stride}')
  if model.up_to is not None and not 1 <= model.up_to <= num_blocks(model):
    raise ValueError(f'up_to must be None or a DNA block in 1..{num_blocks(model)}, got {model.up_to}')
  if len(shape) != 4:
    raise ValueError(f'EfficientNet expects NHWC images, got shape {tuple(shape)}')
  if model.keras_input and shape[-1] != 3:
    raise ValueError(f'keras_input=True expects 3-channel RGB images (0..255), got shape {tuple(shape)}')


def _keras_variant(width: float, depth: float, dropout: float) -> Any:
  return functools.partial(
    EfficientNet, width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout, keras_input=True
  )


# Keras's coefficients (width, depth, dropout); native resolutions in DEFAULT_RESOLUTIONS.
EfficientNetB0 = _keras_variant(1.0, 1.0, 0.2)
EfficientNetB1 = _keras_variant(1.0, 1.1, 0.2)
EfficientNetB2 = _keras_variant(1.1, 1.2, 0.3)
EfficientNetB3 = _keras_variant(1.2, 1.4, 0.3)
EfficientNetB4 = _keras_variant(1.4, 1.8, 0.4)
EfficientNetB5 = _keras_variant(1.6, 2.2, 0.4)
EfficientNetB6 = _keras_variant(1.8, 2.6, 0.5)
EfficientNetB7 = _keras_variant(2.0, 3.1, 0.5)
# Small demo/test teacher for 32x32 images: stem stride 1, 4 stages (3 DNA blocks), takes normalised input.
EfficientNetTiny = functools.partial(
  EfficientNet,
  stages=TINY_STAGES,
  stem_width=16,
  head_width=128,
  stem_stride=1,
  num_classes=10,
  dropout_rate=0.1,
  drop_connect_rate=0.1,
)
EfficientNetTinyDeep = functools.partial(EfficientNetTiny, stages=TINY_DEEP_STAGES)

VARIANTS = {
  'b0': EfficientNetB0,
  'b1': EfficientNetB1,
  'b2': EfficientNetB2,
  'b3': EfficientNetB3,
  'b4': EfficientNetB4,
  'b5': EfficientNetB5,
  'b6': EfficientNetB6,
  'b7': EfficientNetB7,
  'tiny': EfficientNetTiny,
  'tiny_deep': EfficientNetTinyDeep,
}
# Variants with Keras ImageNet weights (dna_jax.convert_teacher); the others are trained by the teacher stage.
KERAS_VARIANTS = ('b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7')
DEFAULT_RESOLUTIONS = {
  'b0': 224,
  'b1': 240,
  'b2': 260,
  'b3': 300,
  'b4': 380,
  'b5': 456,
  'b6': 528,
  'b7': 600,
  'tiny': 32,
  'tiny_deep': 32,
}


def variant_name(name: str) -> str:
  """Canonical variant key of `name` ('B7', 'efficientnet-b7' -> 'b7'), validated."""
  key = name.lower().removeprefix('efficientnet').lstrip('-_')
  if key not in VARIANTS:
    raise ValueError(f'unknown EfficientNet variant {name!r}; valid: {", ".join(VARIANTS)}')
  return key


def variant(name: str, **overrides: Any) -> EfficientNet:
  """A named variant ('b0'..'b7', 'tiny', 'tiny_deep'), with attribute overrides (e.g. num_classes, up_to)."""
  return VARIANTS[variant_name(name)](**overrides)
