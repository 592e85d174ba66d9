"""Training-time image augmentations as stateless TensorFlow ops (every draw from an explicit seed).

Images are float32 (H, W, 3) in 0..255 throughout. Used by `input_pipeline` for the training and,
optionally, the calibration stream: the inception crop window, colour jitter, RandAugment (timm's
ranges) and random erasing.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import math
from typing import Any

import numpy as np
import tensorflow as tf

from dna_jax import images as images_lib

MAX_MAGNITUDE = 10  # RandAugment's magnitude scale
ERASING_MODES = ('uniform', 'normal')


def random_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Inception-style crop: 8%-100% of the area, aspect ratio 3/4..4/3."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
    seed=seed,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image)


def blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor):
  """image at factor 1, degenerate at 0, extrapolated beyond; clipped."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast, saturation, each by a factor in 1 +- strength."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  low, high = max(0.0, 1.0 - strength), 1.0 + strength
  factor = [tf.random.stateless_uniform((), s, low, high) for s in seeds]
  image = blend(image, tf.zeros_like(image), factor[0])
  image = blend(image, tf.reduce_mean(grayscale(image)), factor[1])
  return blend(image, grayscale(image), factor[2])


def affine(image: tf.Tensor, transform: Sequence[Any]) -> tf.Tensor:
  """Maps output (x, y) from input (a x + b y + c, d x + e y + f); gray fill."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  transform = tf.stack([tf.cast(t, tf.float32) for t in transform] + [0.0, 0.0])
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform[None],
    output_shape=tf.stack([height, width]),
    fill_value=128.0,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )[0]


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  radians = degrees * math.pi / 180
  cos, sin = tf.cos(radians), tf.sin(radians)
  cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1) / 2
  cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1) / 2
  return affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def sharpen(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], (1, 1, 3, 1))
  inner = tf.nn.depthwise_conv2d(image[None], kernel, (1, 1, 1, 1), 'VALID')[0]
  padding = ((1, 1), (1, 1), (0, 0))
  smooth = tf.pad(inner, padding)
  border = tf.pad(tf.zeros_like(inner), padding, constant_values=1.0)
  return blend(image, border * image + (1 - border) * smooth, factor)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  low = tf.reduce_min(image, axis=(0, 1))
  high = tf.reduce_max(image, axis=(0, 1))
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-3), 1.0)
  return tf.where(high > low, (image - low) * scale, image)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  step = 2.0 ** (8 - bits)
  return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: float) -> tf.Tensor:
  return tf.where(image >= threshold, 255.0 - image, image)


def rand_augment_ops(level: float, size: int) -> list[Callable[[tf.Tensor, tf.Tensor], Any]]:
  """RandAugment's ops at level in [0, 1] (timm's ranges); (image, sign)."""
  enhance = 0.9 * level  # Factor 1 +- this for color/contrast/...
  shear, shift = 0.3 * level, 0.45 * level * size
  return [
    lambda x, s: x,
    lambda x, s: auto_contrast(x),
    lambda x, s: rotate(x, 30.0 * level * s),
    lambda x, s: solarize(x, 256.0 - 256.0 * level),
    lambda x, s: posterize(x, max(1, 8 - round(4 * level))),
    lambda x, s: blend(x, grayscale(x), 1.0 + enhance * s),
    lambda x, s: blend(x, tf.reduce_mean(grayscale(x)), 1.0 + enhance * s),
    lambda x, s: blend(x, tf.zeros_like(x), 1.0 + enhance * s),
    lambda x, s: sharpen(x, 1.0 + enhance * s),
    lambda x, s: affine(x, [1.0, shear * s, 0.0, 0.0, 1.0, 0.0]),
    lambda x, s: affine(x, [1.0, 0.0, 0.0, shear * s, 1.0, 0.0]),
    lambda x, s: affine(x, [1.0, 0.0, shift * s, 0.0, 1.0, 0.0]),
    lambda x, s: affine(x, [1.0, 0.0, 0.0, 0.0, 1.0, shift * s]),
  ]


def rand_augment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """Applies num_layers ops drawn uniformly, each with a random sign."""
  shape = image.shape
  ops = rand_augment_ops(magnitude / MAX_MAGNITUDE, shape[0])
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
    index = tf.random.stateless_uniform((), op_seed, 0, len(ops), tf.int32)
    sign = tf.where(tf.random.stateless_uniform((), sign_seed) < 0.5, -1.0, 1.0)
    image = tf.switch_case(index, [lambda op=op, x=image, s=sign: op(x, s) for op in ops])
    image.set_shape(shape)
  return image


def random_erasing(image: tf.Tensor, probability: float, seed: tf.Tensor, mode: str = 'uniform') -> tf.Tensor:
  """With `probability`, fills a random box (2%-33% of the area, aspect ratio 0.3..3.3) with per-pixel noise.

  mode 'uniform': uniform over 0..255; 'normal': timm's RandomErasing(mode='pixel') as the authors ran
  it, standard normal noise in ImageNet-normalised units (255 * (mean + std * z) in pixels, unclipped).
  """
  if mode not in ERASING_MODES:
    raise ValueError(f'random erasing mode {mode!r}; valid: {", ".join(ERASING_MODES)}')
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
  height, width = image.shape[0], image.shape[1]
  area = tf.random.stateless_uniform((), seeds[0], 0.02, 1 / 3) * height * width
  ratio = tf.exp(tf.random.stateless_uniform((), seeds[1], math.log(0.3), -math.log(0.3)))
  box_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, height)
  box_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, width)
  top = tf.random.stateless_uniform((), seeds[2], 0, height - box_h + 1, tf.int32)
  left = tf.random.stateless_uniform((), seeds[3], 0, width - box_w + 1, tf.int32)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  erase = tf.random.stateless_uniform((), seeds[4]) < probability
  if mode == 'uniform':
    noise = tf.random.stateless_uniform(image.shape, seeds[5], 0.0, 255.0)
  else:
    z = tf.random.stateless_normal(image.shape, seeds[5])
    noise = 255.0 * (
      np.asarray(images_lib.IMAGENET_MEAN, np.float32) + np.asarray(images_lib.IMAGENET_STD, np.float32) * z
    )
  return tf.where(inside & erase, noise, image)
