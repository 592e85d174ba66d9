"""Image value conventions shared by the input pipeline, training and export (NumPy only).

A normalization names what a net reads: 'raw' 0..255 RGB, 'unit' 0..1, or 'imagenet'
(x / 255 - mean) / std with the ImageNet channel statistics. `normalize` is plain array
arithmetic, so one function serves NumPy, JAX and TensorFlow arrays alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('raw', 'unit', 'imagenet')


def check_normalization(name: str, what: str = 'normalization') -> str:
  """`name` if it is one of NORMALIZATIONS, else a ValueError naming `what`."""
  if name not in NORMALIZATIONS:
    raise ValueError(f'{what}={name!r} is not one of {", ".join(NORMALIZATIONS)}')
  return name


def normalize(images: Any, source: str, target: str) -> Any:
  """Converts float images from normalization `source` to `target` (see the module docstring)."""
  check_normalization(source, 'source normalization')
  check_normalization(target, 'target normalization')
  if source == target:
    return images
  mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
  if source == 'raw':
    unit = images / 255.0
  elif source == 'imagenet':
    unit = images * std + mean
  else:
    unit = images
  if target == 'raw':
    return unit * 255.0
  if target == 'imagenet':
    return (unit - mean) / std
  return unit
