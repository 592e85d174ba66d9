"""Prepares a tfds dataset once, so that the input pipeline can read it.

  python -m dna_jax.prepare_data --dataset imagenet2012 --data_dir DIR \
      [--manual_dir M]
  python -m dna_jax.prepare_data --dataset fashion_mnist --data_dir DIR

imagenet2012 is built by tfds from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar, looked up in `--manual_dir` (default
<data_dir>/downloads/manual). fashion_mnist is built offline from the files of
the Debian package `dataset-fashion-mnist` when they are present (each checked
against its pinned sha256), else tfds downloads it. Any other tfds dataset is
downloaded by tfds. Either way the result is a normal prepared tfds dataset in
<data_dir>, read with `tfds.builder(name, data_dir=...)`.
"""

from __future__ import annotations

import os
import tempfile

from absl import flags
import tensorflow_datasets as tfds

from dna_jax import cli
from dna_jax import config_base

# Where the Debian package `dataset-fashion-mnist` puts its files.
FASHION_MNIST_DEBIAN_DIR = config_base.FASHION_MNIST_DEBIAN_DIR

# sha256 of the Debian package's files (version 0.0~git20200523.55506a9-1).
# They hold the upstream images and labels, but were re-gzipped without the
# original file names, so tfds's registered checksums of the upstream .gz
# files do not match them.
_FASHION_MNIST_SHA256 = {
  'train-images-idx3-ubyte.gz': 'b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7',
  'train-labels-idx1-ubyte.gz': '0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056',
  't10k-images-idx3-ubyte.gz': 'cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa',
  't10k-labels-idx1-ubyte.gz': '8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05',
}

_IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def _data_dir_root(data_dir: str | None) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return tfds.core.constants.get_default_data_dir()


def _manual_dir(data_dir: str | None, manual_dir: str | None) -> str:
  if manual_dir:
    return os.path.expanduser(manual_dir)
  return os.path.join(_data_dir_root(data_dir), 'downloads', 'manual')


def instructions(dataset: str, data_dir: str | None) -> str:
  """How to prepare `dataset` in `data_dir`, as a message for the user."""
  root = _data_dir_root(data_dir)
  command = f'python -m dna_jax.prepare_data --dataset {dataset} --data_dir {root}'
  if dataset == 'imagenet2012':
    return (
      f'Put {" and ".join(_IMAGENET_TARS)} in '
      f'{_manual_dir(data_dir, None)} (or pass --manual_dir) and run '
      f'once:\n  {command}'
    )
  if dataset == 'fashion_mnist':
    return (
      f'Run once:\n  {command}\nIt uses the files of the Debian package '
      f'dataset-fashion-mnist ({FASHION_MNIST_DEBIAN_DIR}) when present, '
      'else downloads with tfds.'
    )
  return f'Run once (tfds downloads it, needs internet access):\n  {command}'


def prepare(
  dataset: str,
  data_dir: str | None = None,
  *,
  manual_dir: str | None = None,
  local_files_dir: str | None = FASHION_MNIST_DEBIAN_DIR,
  max_examples_per_split: int | None = None,
) -> None:
  """Prepares `dataset` in `data_dir` (tfds's default when None).

  Args:
    dataset: a tfds dataset name, e.g. 'imagenet2012' or 'fashion_mnist'.
    data_dir: the tfds data directory.
    manual_dir: imagenet2012 only: where the ILSVRC2012 tars are.
    local_files_dir: fashion_mnist only: the directory of the Debian package's
      files, used when present (None: always download).
    max_examples_per_split: keep only the first examples of each split (tests
      and smoke runs).
  """
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown tfds dataset {dataset!r}.') from None
  if builder.is_prepared():
    print(f'{dataset} is already prepared in {builder.data_dir}')
    return
  config = tfds.download.DownloadConfig(max_examples_per_split=max_examples_per_split)
  if dataset == 'imagenet2012':
    _prepare_imagenet(builder, _manual_dir(data_dir, manual_dir), config)
  elif dataset == 'fashion_mnist' and local_files_dir and os.path.isdir(local_files_dir):
    _prepare_fashion_mnist_locally(data_dir, local_files_dir, config)
  else:
    _download_and_prepare(builder, dataset, config)
  print(f'{dataset} prepared in {builder.data_dir}')


def _prepare_imagenet(builder: tfds.core.DatasetBuilder, manual_dir: str, config: tfds.download.DownloadConfig) -> None:
  """Builds imagenet2012 from the tars in `manual_dir`."""
  missing = [f for f in _IMAGENET_TARS if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise FileNotFoundError(
      f'imagenet2012: {", ".join(missing)} not found in {manual_dir}. '
      f'Download them from https://image-net.org (registration needed), '
      'put them there (or pass --manual_dir) and run this command again.'
    )
  try:
    builder.download_and_prepare(download_config=config.replace(manual_dir=manual_dir))
  except AssertionError as e:  # tfds's check of an empty manual_dir.
    raise FileNotFoundError(f'imagenet2012: tfds could not use the manual_dir {manual_dir}: {e}') from None


def _check_sha256(path: str, expected: str) -> None:
  got = tfds.download.checksums.compute_url_info(path).checksum
  if got != expected:
    raise ValueError(
      f'{path} has sha256 {got}, expected {expected}: the file '
      'is corrupt or not the Debian package dataset-fashion-'
      "mnist's; reinstall it (apt-get install --reinstall "
      'dataset-fashion-mnist) or delete it to download instead.'
    )


def _prepare_fashion_mnist_locally(data_dir: str | None, files_dir: str, config: tfds.download.DownloadConfig) -> None:
  """Runs tfds's own fashion_mnist builder on local copies of its files.

  The builder is subclassed only to register the local files' checksums under
  the upstream URLs; tfds then finds each file in the manual_dir, verifies its
  size and sha256 against those, and runs the unchanged example generator. The
  prepared dataset is the normal `fashion_mnist` (same name, version, features
  and example order as a downloaded one).
  """
  missing = [f for f in _FASHION_MNIST_SHA256 if not os.path.isfile(os.path.join(files_dir, f))]
  if missing:
    raise FileNotFoundError(
      f'fashion_mnist: {", ".join(missing)} missing from {files_dir}. '
      'Install them with `apt-get install dataset-fashion-mnist`, or give '
      'tfds internet access and run with --local_files_dir "" to download.'
    )
  for name, sha in _FASHION_MNIST_SHA256.items():
    _check_sha256(os.path.join(files_dir, name), sha)
  upstream = tfds.builder_cls('fashion_mnist')
  url_infos = {
    upstream.URL + name: tfds.download.checksums.UrlInfo(
      size=os.path.getsize(os.path.join(files_dir, name)), checksum=sha, filename=name
    )
    for name, sha in _FASHION_MNIST_SHA256.items()
  }

  class LocalFashionMnist(upstream, skip_registration=True):
    name = upstream.name

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
      return url_infos

  with tempfile.TemporaryDirectory() as extract_dir:
    LocalFashionMnist(data_dir=data_dir).download_and_prepare(
      download_config=config.replace(manual_dir=files_dir, extract_dir=extract_dir)
    )


def _download_and_prepare(
  builder: tfds.core.DatasetBuilder, dataset: str, config: tfds.download.DownloadConfig
) -> None:
  """Lets tfds download and prepare `dataset`, explaining a failure."""
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = _manual_dir(str(builder.data_dir_root), None)
    if not os.path.isdir(manual) or not os.listdir(manual):
      raise FileNotFoundError(
        f'{dataset} needs files downloaded by hand into {manual} (or pass '
        f'--manual_dir):\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}'
      )
  try:
    builder.download_and_prepare(download_config=config)
  except AssertionError as e:  # tfds's check of an empty manual_dir.
    raise FileNotFoundError(f'{dataset}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    ways_out = 'give tfds internet access'
    if dataset == 'fashion_mnist':
      ways_out = 'install the Debian package (apt-get install dataset-fashion-mnist), or ' + ways_out
    raise ValueError(
      f'tfds could not download and prepare {dataset} '
      f'({type(e).__name__}: {e}). To fix: {ways_out}, and '
      'run this command again.'
    ) from None


FLAGS = flags.FlagValues()
flags.DEFINE_string('dataset', None, "tfds name, e.g. 'imagenet2012', 'fashion_mnist'.", flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, "tfds data directory (default: tfds's).", flag_values=FLAGS)
flags.DEFINE_string(
  'manual_dir',
  None,
  'imagenet2012: directory of the ILSVRC2012 tars (default: <data_dir>/downloads/manual).',
  flag_values=FLAGS,
)
flags.DEFINE_string(
  'local_files_dir',
  FASHION_MNIST_DEBIAN_DIR,
  'fashion_mnist: directory of the Debian package files; "" to download instead.',
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  'max_examples_per_split', None, 'Keep only this many examples per split (smoke runs).', flag_values=FLAGS
)
flags.mark_flag_as_required('dataset', flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  prepare(
    FLAGS.dataset,
    FLAGS.data_dir,
    manual_dir=FLAGS.manual_dir,
    local_files_dir=FLAGS.local_files_dir or None,
    max_examples_per_split=FLAGS.max_examples_per_split,
  )


if __name__ == '__main__':
  cli.run(main, FLAGS)
