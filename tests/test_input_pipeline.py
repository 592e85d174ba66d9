"""Tests of dna_jax.input_pipeline and dna_jax.prepare_data.

Written for any number of local devices (tests/conftest.py simulates 8).
"""

import gzip
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dna_jax import augment
from dna_jax import cli
from dna_jax import config_base
from dna_jax import images as images_lib
from dna_jax import input_pipeline
from dna_jax import prepare_data

from helpers import tiny_imagenet

_PER_CLASS, _VAL = 8, 6


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory) -> str:
  """A real imagenet2012 prepared by tfds from tiny hand-made tars."""
  return tiny_imagenet.make(str(tmp_path_factory.mktemp('imagenet')), _PER_CLASS, _VAL)


def _config(data_dir=None, **overrides):
  config = config_base.get_data_config()
  config.update(
    dict(data_dir=data_dir, image_size=16, rating_examples=8, calib_examples=4, shuffle_buffer=32, num_threads=1)
  )
  config.update(overrides)
  return config


def _flat(batches, key: str) -> np.ndarray:
  """Examples of `key` in a list of batches, device axes flattened."""
  return np.concatenate([b[key].reshape((-1,) + b[key].shape[2:]) for b in batches])


def _ids(batches) -> list[bytes]:
  """One identity per real (mask 1) example: its preprocessed pixels."""
  batches = list(batches)
  return [image.tobytes() for image, m in zip(_flat(batches, 'image'), _flat(batches, 'mask')) if m]


def _simulate_processes(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(jax, 'device_count', lambda: count)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)


def test_bad_settings_are_early_errors(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match=r"normalization='z'.*'raw'"):
    input_pipeline.check_dataset(_config(normalization='z'))
  with pytest.raises(ValueError, match='not a tfds dataset name'):
    input_pipeline.check_dataset(_config(dataset='imagenet2013'))
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  with pytest.raises(ValueError, match='batch size 7 does not divide evenly over the 2 devices'):
    input_pipeline.create_split(_config(), 'train', 7)
  # An empty data_dir: says which tars go where and what to run.
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.check_dataset(_config(str(tmp_path)))
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'python -m dna_jax.prepare_data --dataset imagenet2012' in message


def test_prepare_imagenet_without_tars(tmp_path, capsys):
  (tmp_path / 'manual').mkdir()
  args = ['--dataset', 'imagenet2012', '--data_dir', str(tmp_path), '--manual_dir', str(tmp_path / 'manual')]
  assert cli.call(prepare_data.main, prepare_data.FLAGS, args) == 2
  assert 'ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not found' in capsys.readouterr().err


@pytest.fixture
def mock_imagenet(monkeypatch):
  # mock_data leaves the builder unprepared and info.splits empty.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda _: True)
  with tfds.testing.mock_data(num_examples=10):
    yield


def test_mock_imagenet_normalizations(mock_imagenet):
  del mock_imagenet
  devices = jax.local_device_count()
  batches = {}
  for normalization in ('raw', 'unit', 'imagenet'):
    config = _config(normalization=normalization, image_size=24)
    assert input_pipeline.check_dataset(config) == 1000
    assert input_pipeline.num_examples(config, 'eval') is None
    batches[normalization] = list(input_pipeline.create_split(config, 'eval', 4 * devices))
    train = next(input_pipeline.create_split(config, 'train', 2 * devices))
    assert train['image'].shape == (devices, 2, 24, 24, 3)
    assert train['image'].dtype == np.float32
    assert train['label'].dtype == np.int32
    assert train['label'].shape == (devices, 2)
    np.testing.assert_array_equal(train['mask'], np.ones((devices, 2)))
  # 10 examples: the last batch is padded with zeros, mask 0.
  raw = batches['raw']
  mask = _flat(raw, 'mask')
  assert mask.sum() == 10 and len(mask) == len(raw) * 4 * devices
  np.testing.assert_array_equal(mask[:10], 1)
  assert not _flat(raw, 'image')[10:].any()
  images = _flat(raw, 'image')[:10]
  assert images.min() >= 0 and images.max() <= 255 and images.max() > 200
  np.testing.assert_allclose(_flat(batches['unit'], 'image')[:10], images / 255, atol=1e-6)
  mean, std = images_lib.IMAGENET_MEAN, images_lib.IMAGENET_STD
  np.testing.assert_allclose(_flat(batches['imagenet'], 'image')[:10], (images / 255 - mean) / std, atol=1e-5)
  bf16 = next(input_pipeline.create_split(_config(dtype='bfloat16'), 'eval', devices))
  assert bf16['image'].dtype == tf.bfloat16.as_numpy_dtype


def test_mock_imagenet_restart(mock_imagenet):
  del mock_imagenet
  config = _config(color_jitter=0.4, random_erasing=0.5)
  batch = jax.device_count()
  fresh = input_pipeline.create_split(config, 'train', batch)
  fresh = [next(fresh) for _ in range(5)]
  restarted = input_pipeline.create_split(config, 'train', batch, start_step=3)
  for expected in fresh[3:]:
    got = next(restarted)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  images = np.stack([b['image'] for b in fresh])
  assert images.min() >= 0 and images.max() <= 255


def test_rate_split_is_held_out(imagenet_dir):
  config = _config(imagenet_dir, augment='none')
  assert input_pipeline.check_dataset(config) == 1000
  assert [input_pipeline.num_examples(config, s) for s in input_pipeline.SPLITS] == [16, 8, 4, 6]
  batch = 2 * jax.device_count()
  rate = list(input_pipeline.create_split(config, 'rate', batch))
  train = list(input_pipeline.create_split(config, 'train', batch, repeat=False))
  assert len(rate) == -(-8 // batch) and _flat(rate, 'mask').sum() == 8
  rate_ids, train_ids = set(_ids(rate)), set(_ids(train))
  assert len(rate_ids) == 8 and len(train_ids) == 16
  assert not rate_ids & train_ids
  # 'calib' repeats training examples (here eval-style, as 'none' is).
  calib = input_pipeline.create_split(_config(imagenet_dir, calib_examples=8), 'calib', 8)
  calib_ids = _ids([next(calib), next(calib)])
  assert set(calib_ids) <= train_ids and len(set(calib_ids)) == 8
  with pytest.raises(ValueError, match='calib_examples=4 is less than the calibration batch of 8'):
    input_pipeline.create_split(config, 'calib', 8)
  labels = np.concatenate(
    [_flat(rate, 'label')[_flat(rate, 'mask') > 0], _flat(train, 'label')[_flat(train, 'mask') > 0]]
  )
  np.testing.assert_array_equal(np.bincount(labels), [_PER_CLASS] * 3)
  with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\]"):
    input_pipeline.check_dataset(_config(imagenet_dir, eval_split='test'))


def test_processes_read_disjoint_shards(imagenet_dir, monkeypatch):
  # Simulated processes with one device each.
  config = _config(imagenet_dir, augment='none')
  train = []
  for index in (0, 1):
    _simulate_processes(monkeypatch, index, 2)
    train.append(_ids(input_pipeline.create_split(config, 'train', 4, repeat=False)))
  assert [len(t) for t in train] == [8, 8]
  assert len(set(train[0]) | set(train[1])) == 16
  # 6 eval examples over 4 processes, 1 per batch: shards of 2, 2, 1, 1, but
  # every process runs 2 batches (the last ones all mask 0).
  evals, masks = [], []
  for index in range(4):
    _simulate_processes(monkeypatch, index, 4)
    batches = list(input_pipeline.create_split(config, 'eval', 4))
    assert [b['image'].shape for b in batches] == [(1, 1, 16, 16, 3)] * 2
    masks.append([float(b['mask'].sum()) for b in batches])
    evals += _ids(batches)
  assert masks == [[1, 1], [1, 1], [1, 0], [1, 0]]
  assert len(set(evals)) == 6


def test_rating_batches_hold_the_same_images_on_any_number_of_processes(imagenet_dir, monkeypatch):
  """Global rating batch b is the same images in the same order with 1 or 3 processes (8 images, batch 3)."""
  config = _config(imagenet_dir, augment='none')
  _simulate_processes(monkeypatch, 0, 1)
  alone = list(input_pipeline.create_split(config, 'rate', 3))
  reference = [_flat([b], 'image')[_flat([b], 'mask') > 0].tobytes() for b in alone]
  parts = []
  for index in range(3):
    _simulate_processes(monkeypatch, index, 3)
    parts.append(list(input_pipeline.create_split(config, 'rate', 3)))
  assert [len(p) for p in parts] == [len(alone)] * 3 == [3] * 3
  for b, expected in enumerate(reference):
    rows = [(_flat([p[b]], 'image'), _flat([p[b]], 'mask')) for p in parts]
    assert np.concatenate([image[mask > 0] for image, mask in rows]).tobytes() == expected
  # the last global batch holds images 6 and 7: processes 0 and 1 one each, process 2 only padding
  assert [float(p[2]['mask'].sum()) for p in parts] == [1, 1, 0]


def test_restart_across_epochs_is_exact(imagenet_dir):
  # 16 training examples per epoch = 2 batches of 8; steps 3..5 are in epoch 2.
  config = _config(imagenet_dir, color_jitter=0.4, randaugment_layers=2, random_erasing=0.5)
  fresh = input_pipeline.create_split(config, 'train', 8)
  fresh = [next(fresh) for _ in range(6)]
  restarted = input_pipeline.create_split(config, 'train', 8, start_step=3)
  for expected in fresh[3:]:
    got = next(restarted)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
  images = _flat(fresh, 'image')
  assert images.min() >= 0 and images.max() <= 255
  epochs = [_flat(fresh[i : i + 2], 'label') for i in (0, 2)]
  np.testing.assert_array_equal(*[np.bincount(l) for l in epochs])
  assert (epochs[0] != epochs[1]).any()  # Reshuffled.


def test_random_erasing_fills_one_box(imagenet_dir):
  plain = next(input_pipeline.create_split(_config(imagenet_dir), 'train', 8))
  erased = next(input_pipeline.create_split(_config(imagenet_dir, random_erasing=1.0), 'train', 8))
  changed = (_flat([plain], 'image') != _flat([erased], 'image')).any(-1)
  for mask in changed:
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 256 - 1 <= box <= 256 / 3 + 32  # Rounded sides.
    assert mask.sum() >= 0.9 * box  # A filled rectangle.


def test_random_erasing_with_the_authors_normal_noise(imagenet_dir):
  plain = _flat([next(input_pipeline.create_split(_config(imagenet_dir), 'train', 8))], 'image')
  config = _config(imagenet_dir, random_erasing=1.0, random_erasing_mode='normal', normalization='imagenet')
  erased = _flat([next(input_pipeline.create_split(config, 'train', 8))], 'image')
  plain = images_lib.normalize(plain, 'raw', 'imagenet')
  noise = erased[(erased != plain).any(-1)]  # erased pixels, in ImageNet-normalised units: N(0, 1)
  assert len(noise) > 50 and abs(noise.mean()) < 0.3 and 0.8 < noise.std() < 1.2
  assert noise.min() < 0 and noise.max() > 2.0  # unclipped, unlike 0..255 uniform noise


def test_random_interpolation_uses_bilinear_and_bicubic(imagenet_dir):
  def batch(**overrides):
    return _flat([next(input_pipeline.create_split(_config(imagenet_dir, **overrides), 'train', 16))], 'image')

  bilinear, bicubic = batch(train_resize_method='bilinear'), batch(train_resize_method='bicubic')
  mixed = batch(train_resize_method='random')
  same_as = [(m == b).all() for m, b in zip(mixed, bilinear)], [(m == c).all() for m, c in zip(mixed, bicubic)]
  assert all(x or y for x, y in zip(*same_as)) and any(same_as[0]) and any(same_as[1])
  assert not np.array_equal(bilinear, bicubic)


def test_calibration_batch_is_eval_style_or_augmented(imagenet_dir):
  plain = next(input_pipeline.create_split(_config(imagenet_dir, calib_examples=8), 'calib', 8))
  augmented = next(input_pipeline.create_split(_config(imagenet_dir, calib_examples=8, calib_augment=True), 'calib', 8))
  np.testing.assert_array_equal(plain['label'], augmented['label'])  # the same images...
  assert not np.allclose(plain['image'], augmented['image'])  # ...cropped and flipped as training images are


def test_rand_augment_ops_on_constant_image():
  image = tf.fill((8, 8, 3), 100.0)
  ops = augment.rand_augment_ops(1.0, 8)
  results = [op(image, 1.0).numpy() for op in ops]
  centers = [r[3:5, 3:5].mean() for r in results[:11]]
  # identity, autocontrast, rotate, solarize (threshold 0), posterize (4 bits),
  # color, contrast, brightness x1.9, sharpness, shears.
  np.testing.assert_allclose(centers, [100, 100, 100, 155, 96, 100, 100, 190, 100, 100, 100], atol=0.02)
  # Translations by 0.45 * 8 = 3.6 pixels: gray (128) comes in.
  translate_x, translate_y = results[11:]
  np.testing.assert_allclose(translate_x[:, :4], 100)
  np.testing.assert_allclose(translate_x[:, 5:], 128)
  np.testing.assert_allclose(translate_y[:4], 100)
  np.testing.assert_allclose(translate_y[5:], 128)


@pytest.mark.skipif(
  not os.path.isdir(prepare_data.FASHION_MNIST_DEBIAN_DIR), reason='apt-get install dataset-fashion-mnist'
)
def test_fashion_mnist_from_debian_files(tmp_path):
  data_dir = str(tmp_path / 'data')
  prepare_data.prepare('fashion_mnist', data_dir, max_examples_per_split=300)
  assert tfds.builder('fashion_mnist', data_dir=data_dir).is_prepared()
  config = _config(
    data_dir,
    dataset='fashion_mnist',
    eval_split='test',
    image_size=32,
    small_image_fit='pad',
    crop_fraction=1.0,
    rating_examples=100,
    calib_examples=50,
  )
  assert input_pipeline.check_dataset(config) == 10
  devices = jax.local_device_count()
  batches = list(input_pipeline.create_split(config, 'eval', 64 * devices))
  assert [b['image'].shape for b in batches] == [(devices, 64, 32, 32, 3)]
  real = _flat(batches, 'mask') > 0
  assert real.sum() == 300
  images, labels = _flat(batches, 'image')[real], _flat(batches, 'label')[real]
  assert labels.min() >= 0 and labels.max() <= 9
  assert (images[..., :1] == images).all()  # Gray in all three channels.
  assert not images[:, :2].any() and not images[:, :, 30:].any()  # Padding.
  # The same 300 images and labels as the first 300 of the raw test files.
  files = prepare_data.FASHION_MNIST_DEBIAN_DIR
  with gzip.open(os.path.join(files, 't10k-images-idx3-ubyte.gz')) as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:300]
  with gzip.open(os.path.join(files, 't10k-labels-idx1-ubyte.gz')) as f:
    raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)[:300]
  np.testing.assert_array_equal(
    np.sort(images[:, 2:30, 2:30, 0].reshape(300, -1).sum(1)), np.sort(raw.reshape(300, -1).sum(1, dtype=np.int64))
  )
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(raw_labels, minlength=10))
  assert images.mean() == pytest.approx(raw.mean() * 28**2 / 32**2, rel=1e-6)
  config.augment = 'simple'
  train = next(input_pipeline.create_split(config, 'train', 2 * devices))
  assert train['image'].shape == (devices, 2, 32, 32, 3)
  assert train['image'].min() >= 0 and train['image'].max() <= 255


def test_fashion_mnist_bad_local_files(tmp_path):
  files = tmp_path / 'files'
  files.mkdir()
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-'):
    prepare_data.prepare('fashion_mnist', str(tmp_path), local_files_dir=str(files))
  if not os.path.isdir(prepare_data.FASHION_MNIST_DEBIAN_DIR):
    return
  for name in os.listdir(prepare_data.FASHION_MNIST_DEBIAN_DIR):
    if 'labels' in name:
      shutil.copy(os.path.join(prepare_data.FASHION_MNIST_DEBIAN_DIR, name), files)
  for name in ('train-images-idx3-ubyte.gz', 't10k-images-idx3-ubyte.gz'):
    (files / name).write_bytes(b'not the images')
  with pytest.raises(ValueError, match='sha256'):
    prepare_data.prepare('fashion_mnist', str(tmp_path), local_files_dir=str(files))


def test_autotune_switch_keeps_the_batches(imagenet_dir):
  config = _config(imagenet_dir)
  assert input_pipeline.dataset_options(config).autotune.enabled
  config.autotune, config.num_threads = False, 2
  options = input_pipeline.dataset_options(config)
  assert not options.autotune.enabled and options.threading.private_threadpool_size == 2
  config.num_threads = 0
  tuned = next(input_pipeline.create_split(_config(imagenet_dir), 'train', 8))
  fixed = next(input_pipeline.create_split(config, 'train', 8))
  np.testing.assert_array_equal(tuned['image'], fixed['image'])
  np.testing.assert_array_equal(tuned['label'], fixed['label'])
