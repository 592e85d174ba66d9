"""A real imagenet2012 prepared by tfds offline from tiny hand-made tars (a few random JPEGs per class)."""

import io
import os
import tarfile

import numpy as np
import tensorflow as tf

from dna_jax import prepare_data

CLASSES = ('n01440764', 'n01443537', 'n01484850')  # imagenet2012 labels 0-2.


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels).numpy()


def make(root: str, per_class: int = 8, validation: int = 6, seed: int = 0) -> str:
  """Writes the tars under ROOT/manual, prepares ROOT/data with tfds and returns that data_dir."""
  manual = os.path.join(root, 'manual')
  os.makedirs(manual, exist_ok=True)
  rng = np.random.default_rng(seed)
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for name in CLASSES:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for i in range(per_class):
          _add(tar, f'{name}_{i}.JPEG', _jpeg(rng, 30, 40))
      _add(outer, f'{name}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    for i in range(validation):
      _add(tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, 40, 30))
  data_dir = os.path.join(root, 'data')
  prepare_data.prepare('imagenet2012', data_dir, manual_dir=manual)
  return data_dir
