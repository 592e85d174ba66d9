"""Input pipeline: tfds image-classification datasets as per-device batches.

One pipeline serves distillation, rating and retraining. Splits (names used by
`create_split`):

* 'train': `train_split[rating_examples:]`, augmented, shuffled, repeated.
* 'rate': `train_split[:rating_examples]`, held out from training, eval-style.
  tfds shuffles examples when it prepares a dataset, so a prefix of the train
  split is a random subset, and the same one on every process and run.
* 'calib': `train_split[rating_examples:rating_examples + calib_examples]`, a
  small repeated stream of training images for BatchNorm recalibration,
  eval-style or train-augmented (`calib_augment`), the same global stream
  whatever the number of processes.
* 'eval': `eval_split`, eval-style.

Each process reads its own `tfds.even_splits` shard of a split, except 'calib' (one global stream)
and 'rate': every process reads the rating split in order and keeps its rows of each global batch
(skipping the others before decoding), so that batch b holds the same images on 1 host as on a pod
slice, and adaptive rating's first slice is the same set of images. Batches are
dicts of numpy arrays: 'image' (local_devices, per_device_batch, H, W, 3),
'label' int32 and 'mask' float32 (local_devices, per_device_batch). Finite
streams (rate and eval by default) pad their last batch with mask 0 and give
every process the same number of batches when split sizes are known.

Determinism (`deterministic=True`): repeated streams are a sequence of epochs,
epoch e shuffled with a seed made from (seed, process, e); every augmentation
draws from a stateless seed made from (seed, process, position of the example
in the stream). `start_step=k` starts at epoch k * local_batch // epoch_size and
skips the rest of the k * local_batch examples of that epoch before decoding, so
it yields exactly the batches k, k+1, ... of a fresh stream. (Where the split
size is unknown, as under `tfds.testing.mock_data`, it skips from the start.)

Image values before `normalization`: float pixels 0..255. 'raw' keeps them (the
Keras EfficientNet teacher normalizes inside), 'unit' divides by 255,
'imagenet' then subtracts the ImageNet mean and divides by its std.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import itertools
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dna_jax import augment
from dna_jax import images as images_lib
from dna_jax import prepare_data

SPLITS = ('train', 'rate', 'calib', 'eval')
_AUGMENTS = ('inception', 'simple', 'none')
_SMALL_IMAGE_FITS = ('resize', 'pad')
_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16}
_RESIZE_METHODS = {
  'bicubic': tf.image.ResizeMethod.BICUBIC,
  'bilinear': tf.image.ResizeMethod.BILINEAR,
  'area': tf.image.ResizeMethod.AREA,
  'nearest': tf.image.ResizeMethod.NEAREST_NEIGHBOR,
}


def _validate(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  c = data_config
  choices = {
    'train_resize_method': ('', 'random', *_RESIZE_METHODS),
    'random_erasing_mode': augment.ERASING_MODES,
    'normalization': images_lib.NORMALIZATIONS,
    'augment': _AUGMENTS,
    'dtype': tuple(_DTYPES),
    'resize_method': tuple(_RESIZE_METHODS),
    'small_image_fit': _SMALL_IMAGE_FITS,
  }
  for field, valid in choices.items():
    if c[field] not in valid:
      raise ValueError(f'data.{field}={c[field]!r}; expected one of {valid}.')
  if c.image_size < 1:
    raise ValueError(f'data.image_size={c.image_size} must be positive.')
  if not 0 < c.crop_fraction <= 1:
    raise ValueError(f'data.crop_fraction={c.crop_fraction} not in (0, 1].')
  if not 0 <= c.random_erasing <= 1:
    raise ValueError(f'data.random_erasing={c.random_erasing} not in [0, 1].')
  if c.color_jitter < 0 or c.simple_pad < 0 or c.randaugment_layers < 0:
    raise ValueError('data.color_jitter, data.simple_pad and data.randaugment_layers must be >= 0.')
  if not 0 <= c.randaugment_magnitude <= augment.MAX_MAGNITUDE:
    raise ValueError(f'data.randaugment_magnitude={c.randaugment_magnitude} not in [0, {augment.MAX_MAGNITUDE}].')
  if c.rating_examples < 0 or c.calib_examples < 1:
    raise ValueError('data.rating_examples must be >= 0 and data.calib_examples >= 1.')
  if '[' in c.train_split:
    raise ValueError(
      f'data.train_split={c.train_split!r} must be a plain split name: rating_examples and calib_examples carve it.'
    )


def _builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder, or an error saying how to prepare it."""
  _validate(data_config)
  name = data_config.dataset
  try:
    builder = tfds.builder(name, data_dir=data_config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"data.dataset={name!r} is not a tfds dataset name (e.g. 'imagenet2012', 'fashion_mnist', 'cifar10')."
    ) from None
  if not builder.is_prepared() and data_config.get('auto_prepare') and name != 'imagenet2012':
    logging.info('Preparing %s in %s (data.auto_prepare).', name, builder.data_dir_root)
    prepare_data.prepare(name, data_config.data_dir or None, local_files_dir=data_config.local_files_dir)
    builder = tfds.builder(name, data_dir=data_config.data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f'Dataset {name} is not prepared in {builder.data_dir_root}. '
      + prepare_data.instructions(name, data_config.data_dir or None)
    )
  return builder


def _feature_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
  """(image key, label key) of an image-classification dataset."""
  keys = info.supervised_keys or ('image', 'label')
  features = info.features
  if (
    len(keys) != 2
    or not all(isinstance(k, str) and k in features for k in keys)
    or not isinstance(features[keys[0]], tfds.features.Image)
    or not isinstance(features[keys[1]], tfds.features.ClassLabel)
  ):
    raise ValueError(
      f'{info.name} is not an image-classification dataset (an Image and a ClassLabel feature): {features}'
    )
  return keys


def _split_spec(data_config: ml_collections.ConfigDict, split: str) -> str:
  """The tfds split string behind one of SPLITS."""
  train, rated = data_config.train_split, data_config.rating_examples
  if split == 'train':
    return f'{train}[{rated}:]' if rated else train
  if split == 'rate':
    if not rated:
      raise ValueError("split 'rate' needs data.rating_examples > 0.")
    return f'{train}[:{rated}]'
  if split == 'calib':
    return f'{train}[{rated}:{rated + data_config.calib_examples}]'
  if split == 'eval':
    return data_config.eval_split
  raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def _split_size(builder: tfds.core.DatasetBuilder, spec: Any) -> int | None:
  """Examples in a tfds split spec; None where unknown (e.g. mock_data)."""
  try:
    return builder.info.splits[spec].num_examples
  except (KeyError, ValueError, AssertionError):
    return None


def check_dataset(data_config: ml_collections.ConfigDict) -> int:
  """Checks data settings and the prepared dataset; returns num_classes."""
  builder = _builder(data_config)
  _, label_key = _feature_keys(builder.info)
  available = list(builder.info.splits)
  for field in ('train_split', 'eval_split'):
    base = data_config[field].split('[')[0]
    if available and base not in available:
      raise ValueError(f'data.{field}={data_config[field]!r}: {data_config.dataset} has splits {available}.')
  train_size = _split_size(builder, data_config.train_split)
  needed = data_config.rating_examples + data_config.calib_examples
  if train_size is not None and needed >= train_size:
    raise ValueError(
      f'data.rating_examples + data.calib_examples = {needed} leaves no '
      f'training examples in {data_config.train_split} ({train_size}).'
    )
  return builder.info.features[label_key].num_classes


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int | None:
  """Examples in one of SPLITS over all processes; None where unknown."""
  return _split_size(_builder(data_config), _split_spec(data_config, split))


# Preprocessing. Images are float32 (H, W, 3) in 0..255 until `_normalize`.


def _decode_window(image_bytes: tf.Tensor, window_fn: Callable[..., tf.Tensor], is_jpeg: bool) -> tf.Tensor:
  """Decodes the window [y, x, h, w] = window_fn(shape) of an image as RGB."""
  if is_jpeg:  # Decodes only the crop.
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
  return image[y : y + h, x : x + w]


def _center_window(shape: tf.Tensor, fraction: float) -> tf.Tensor:
  height, width = shape[0], shape[1]
  side = tf.maximum(1, tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32))
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _fit(image: tf.Tensor, size: int, method: str, fit: str) -> tf.Tensor:
  """Brings an image to (size, size, 3) float by resizing or zero-padding."""
  image = tf.cast(image, tf.float32)

  def resize():
    return tf.image.resize(image, (size, size), _RESIZE_METHODS[method])

  def pad():
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    return tf.image.pad_to_bounding_box(image, (size - height) // 2, (size - width) // 2, size, size)

  if fit == 'pad':
    fits = tf.reduce_all(tf.shape(image)[:2] <= size)
    image = tf.cond(fits, pad, resize)
  else:
    image = resize()
  image = tf.clip_by_value(image, 0.0, 255.0)  # Bicubic overshoots.
  image.set_shape((size, size, 3))
  return image


def _normalize(image: tf.Tensor, normalization: str, dtype: str) -> tf.Tensor:
  return tf.cast(images_lib.normalize(image, 'raw', normalization), _DTYPES[dtype])


def _preprocess_fn(
  data_config: ml_collections.ConfigDict, info: tfds.core.DatasetInfo, augmented: bool, process_index: int
) -> Callable[[tf.Tensor, dict], dict]:
  """(stream position, tfds example) -> {'image', 'label', 'mask'}."""
  c = data_config
  image_key, label_key = _feature_keys(info)
  is_jpeg = info.features[image_key].encoding_format == 'jpeg'
  size = c.image_size

  def fit(image):
    return _fit(image, size, c.resize_method, c.small_image_fit)

  def fit_train(image, seed):
    method = c.train_resize_method or c.resize_method
    if method != 'random':
      return _fit(image, size, method, c.small_image_fit)
    # timm's 'random' interpolation (the authors' training images): bilinear or bicubic, by coin.
    bicubic = tf.random.stateless_uniform((), seed) < 0.5
    return tf.cond(
      bicubic,
      lambda: _fit(image, size, 'bicubic', c.small_image_fit),
      lambda: _fit(image, size, 'bilinear', c.small_image_fit),
    )

  def center_window(shape):
    return _center_window(shape, c.crop_fraction)

  def preprocess(index: tf.Tensor, example: dict) -> dict:
    image_bytes = example[image_key]
    if not augmented:
      image = fit(_decode_window(image_bytes, center_window, is_jpeg))
    else:
      base = tf.constant([c.seed, process_index], tf.int64)
      seed = tf.random.experimental.stateless_fold_in(base, index)
      seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
      if c.augment == 'inception':
        window = _decode_window(image_bytes, lambda shape: augment.random_window(shape, seeds[0]), is_jpeg)
        image = fit_train(window, seeds[5])
      elif c.augment == 'simple':
        image = fit_train(_decode_window(image_bytes, lambda s: tf.stack([0, 0, s[0], s[1]]), is_jpeg), seeds[5])
        padding = ((c.simple_pad, c.simple_pad),) * 2 + ((0, 0),)
        image = tf.image.stateless_random_crop(tf.pad(image, padding), (size, size, 3), seeds[0])
      else:
        image = fit(_decode_window(image_bytes, center_window, is_jpeg))
      if c.augment != 'none':
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
      if c.randaugment_layers:
        image = augment.rand_augment(image, c.randaugment_layers, c.randaugment_magnitude, seeds[2])
      if c.color_jitter:
        image = augment.color_jitter(image, c.color_jitter, seeds[3])
      if c.random_erasing:
        image = augment.random_erasing(image, c.random_erasing, seeds[4], c.random_erasing_mode)
    return {
      'image': _normalize(image, c.normalization, c.dtype),
      'label': tf.cast(example[label_key], tf.int32),
      'mask': tf.constant(1.0, tf.float32),
    }

  return preprocess


def _stream(
  records: tf.data.Dataset,
  *,
  repeat: bool,
  shuffle: bool,
  buffer: int,
  seed: tf.Tensor,
  epoch_size: int | None,
  start: int,
) -> tf.data.Dataset:
  """(position, example) pairs of the stream from position `start` on."""

  def epoch(e):
    if not shuffle:
      return records
    return records.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)

  if not repeat:
    return epoch(tf.constant(0, tf.int64)).enumerate().skip(start)
  first_epoch, offset = divmod(start, epoch_size) if epoch_size else (0, start)
  examples = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  return tf.data.Dataset.zip(tf.data.Dataset.counter(start), examples.skip(offset))


def create_split(
  data_config: ml_collections.ConfigDict,
  split: str,
  global_batch_size: int,
  *,
  start_step: int = 0,
  repeat: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one of SPLITS for this process's devices (see module doc).

  Args:
    data_config: settings as `get_data_config()`.
    split: 'train', 'rate', 'calib' or 'eval'.
    global_batch_size: examples per step over all devices of all processes.
    start_step: number of batches of this stream already consumed (restarts).
    repeat: loop forever; default True for 'train' and 'calib', else False.
      Finite streams pad their last batch with mask 0.

  Yields:
    {'image': (local_devices, per_device, S, S, 3), 'label': int32 and 'mask':
    float32 (local_devices, per_device)} numpy arrays.
  """
  device_count, local_devices = jax.device_count(), jax.local_device_count()
  if global_batch_size < 1 or global_batch_size % device_count:
    raise ValueError(
      f'The global batch size {global_batch_size} does not divide evenly over the {device_count} devices.'
    )
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  spec = _split_spec(data_config, split)
  builder = _builder(data_config)
  info = builder.info
  image_key, _ = _feature_keys(info)
  per_device = global_batch_size // device_count
  local_batch = per_device * local_devices
  process_index, process_count = jax.process_index(), jax.process_count()
  # The calibration stream is one global stream whatever the number of hosts: every process reads the
  # whole split with process 0's seeds and keeps its rows of each global batch, so that BatchNorm
  # recalibration, and hence every rating, is the same on 1 host as on a pod slice.
  global_stream = split == 'calib'
  in_order = split == 'rate' and process_count > 1  # global batches in split order, rows kept per process
  stream_process = 0 if global_stream else process_index
  batch_size = global_batch_size if global_stream else local_batch
  shard = spec
  if process_count > 1 and not (global_stream or in_order):
    shard = tfds.even_splits(spec, n=process_count, drop_remainder=False)[process_index]
  shard_size = _split_size(builder, shard)
  if shard_size == 0:
    raise ValueError(f'Split {split!r} ({spec}) has no examples for process {process_index} of {process_count}.')
  repeat = split in ('train', 'calib') if repeat is None else repeat
  augmented = split == 'train' or (split == 'calib' and data_config.calib_augment)
  if split == 'calib' and shard_size is not None and shard_size < batch_size:
    raise ValueError(
      f'data.calib_examples={data_config.calib_examples} is less than the calibration batch of {batch_size}.'
    )

  records = builder.as_dataset(split=shard, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
  if in_order:
    mine = lambda i, _: (i % global_batch_size) // local_batch == process_index
    records = records.enumerate().filter(mine).map(lambda _, record: record)
  if data_config.cache:
    records = records.cache()
  examples = _stream(
    records,
    repeat=repeat,
    shuffle=split in ('train', 'calib'),
    buffer=data_config.shuffle_buffer,
    seed=tf.constant(data_config.seed * 4099 + stream_process, tf.int64),
    epoch_size=shard_size,
    start=start_step * batch_size,
  )
  ds = examples.map(_preprocess_fn(data_config, info, augmented, stream_process), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=repeat)
  ds = ds.prefetch(data_config.prefetch)
  ds = ds.with_options(dataset_options(data_config))

  batches = ds.as_numpy_iterator()
  if not repeat:
    total = _split_size(builder, spec)
    num_batches = None
    if total is not None:  # The same count on every process.
      most = total if in_order else _ceil_div(total, process_count)  # even_splits' largest shard
      num_batches = max(0, _ceil_div(most, global_batch_size if in_order else local_batch) - start_step)
    zeros = {
      k: np.zeros((local_batch,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()
    }
    batches = _padded(batches, zeros, num_batches)
  if global_stream:
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    batches = ({k: v[rows] for k, v in batch.items()} for batch in batches)
  shape = (local_devices, per_device)
  return ({k: v.reshape(shape + v.shape[1:]) for k, v in batch.items()} for batch in batches)


def dataset_options(data_config: ml_collections.ConfigDict) -> tf.data.Options:
  """tf.data options of every split: determinism, threads and autotuning from the config."""
  options = tf.data.Options()
  options.deterministic = data_config.deterministic
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = bool(data_config.get('autotune', True))
  if data_config.num_threads:
    options.threading.private_threadpool_size = data_config.num_threads
  return options


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _padded(
  batches: Iterator[dict[str, np.ndarray]], zeros: dict[str, np.ndarray], num_batches: int | None
) -> Iterator[dict[str, np.ndarray]]:
  """Pads a short batch with `zeros` (mask 0), then adds all-zero batches up to
  num_batches (when known), so that all processes run the same steps."""
  for count in itertools.count():
    if num_batches is not None and count >= num_batches:
      return
    batch = next(batches, None)
    if batch is None:
      if num_batches is None:
        return
      batch = {k: v[:0] for k, v in zeros.items()}
    short = len(zeros['mask']) - len(batch['mask'])
    if short:
      batch = {k: np.concatenate([v, zeros[k][:short]]) for k, v in batch.items()}
    yield batch
