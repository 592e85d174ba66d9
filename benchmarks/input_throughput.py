"""Training input throughput per CPU core, through the real tfds + tf.data path.

  python -m benchmarks.input_throughput [--num_images 256] [--batch 64]
      [--steps 20] [--image_size 224] [--resize_method bicubic]

Writes `num_images` smooth random 400x300 JPEGs (tf.io.encode_jpeg, quality
95, about 75 KB each like an ImageNet photo of that size) into tiny ILSVRC2012
tars, prepares them as a real tfds imagenet2012 in a temporary data_dir, times
`input_pipeline.create_split(..., 'train', batch)` with the default training
preprocessing (Inception crop fused with JPEG decoding, flip, resize to
image_size, raw float32) on 1 tf.data thread and on all cores. The encoded
examples are cached in memory, so disk reads are not measured.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import tensorflow as tf

from dna_jax import host_memory
from dna_jax import input_pipeline
from dna_jax import prepare_data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_tars(manual_dir: str, num_images: int) -> float:
  """Two classes of random smooth 400x300 JPEGs; returns the mean JPEG KB."""
  rng = np.random.default_rng(0)
  sizes = []
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset in ('n01440764', 'n01443537'):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for i in range(num_images // 2):
          coarse = rng.uniform(0, 255, (1, 38, 50, 3)).astype(np.float32)
          image = tf.image.resize(coarse, (300, 400), 'bicubic')[0]
          image += rng.normal(0, 8, image.shape)  # Some texture.
          image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
          data = tf.io.encode_jpeg(image, quality=95).numpy()
          sizes.append(len(data))
          _add(tar, f'{synset}_{i}.JPEG', data)
      _add(outer, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    _add(tar, 'ILSVRC2012_val_00000001.JPEG', data)
  return float(np.mean(sizes)) / 1024


def images_per_second(config, batch: int, steps: int) -> float:
  batches = input_pipeline.create_split(config, 'train', batch)
  for _ in range(3):  # Warm-up: tracing, cache fill, shuffle buffer.
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--resize_method', default='bicubic')
  args = parser.parse_args(argv)
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as root:
    manual = os.path.join(root, 'manual')
    os.mkdir(manual)
    kb = write_imagenet_tars(manual, args.num_images)
    data_dir = os.path.join(root, 'data')
    prepare_data.prepare('imagenet2012', data_dir, manual_dir=manual)
    config = input_pipeline.get_data_config()
    config.update(
      dict(
        data_dir=data_dir,
        rating_examples=0,
        calib_examples=1,
        cache=True,
        shuffle_buffer=args.num_images,
        image_size=args.image_size,
        resize_method=args.resize_method,
      )
    )
    try:
      input_pipeline.check_dataset(config)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    print(
      f'{args.num_images} JPEGs 400x300 ({kb:.0f} KB mean), train '
      f'preprocessing to {args.image_size}x{args.image_size} '
      f'({args.resize_method}), batch {args.batch}, {args.steps} steps'
    )
    for threads in (1, cores):
      config.num_threads = threads
      rate = images_per_second(config, args.batch, args.steps)
      print(f'  {threads} thread(s): {rate:7.1f} images/s = {rate / threads:6.1f} images/s per core')
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
