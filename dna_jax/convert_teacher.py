"""Convert keras.applications EfficientNet-B0..B7 weights into a dna_jax teacher checkpoint.

  python -m dna_jax.convert_teacher --variant b7 --keras_weights efficientnetb7.h5 --out DIR
  python -m dna_jax.convert_teacher --variant b7 --out gs://BUCKET/teacher_b7   # downloads (needs internet)

`--keras_weights` takes the file Keras downloads for `EfficientNetB7(weights='imagenet')`
(https://storage.googleapis.com/keras-applications/efficientnetb7.h5) or any file written by
`model.save_weights` of a `keras.applications.EfficientNetB*` model. The Keras model is built with
weights=None, the file loaded with `load_weights`, and every Keras variable mapped by layer name onto
the Flax tree (every Flax variable filled exactly once, shapes checked). The result takes 0..255 RGB
pixels, like Keras: see `dna_jax.models.efficientnet` for the normalisation it applies inside.

ImageNet weights: Keras stores the ImageNet std (0.229, 0.224, 0.225) as the Normalization *variance*
and, for weights='imagenet' only, adds a Rescaling by 1/sqrt(std) to compensate (tensorflow issue
49930). `--imagenet_rescale auto` reproduces what `EfficientNetB*(weights='imagenet')` computes: the
rescale is applied when Keras's model has it or when the file's normalization variance is that std.

Before writing, `--verify` (default) compares the Flax model with Keras on random 64x64 images
(logits and every stage output; Keras's extra ImageNet rescale, a constant, is left out on both sides).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads: keep its C++ logging quiet

from absl import flags
import flax
import jax
import keras
import numpy as np

from dna_jax import cli
from dna_jax import images as images_lib
from dna_jax import teacher
from dna_jax import workdir as workdir_lib
from dna_jax.models import efficientnet

KERAS_WEIGHTS_URL = 'https://storage.googleapis.com/keras-applications/'
VERIFY_RESOLUTION = 64
VERIFY_TOLERANCE = 1e-3

# layers.MBConv sub-module -> suffix of the Keras layer 'block{stage}{letter}_{suffix}'.
_MBCONV_LAYERS = {
  'expand_conv': 'expand_conv',
  'expand_bn': 'expand_bn',
  'dwconv': 'dwconv',
  'dw_bn': 'bn',
  'se/reduce': 'se_reduce',
  'se/expand': 'se_expand',
  'project_conv': 'project_conv',
  'project_bn': 'project_bn',
}
_OUTER_LAYERS = {
  'stem/conv': 'stem_conv',
  'stem/bn': 'stem_bn',
  'head/conv': 'top_conv',
  'head/bn': 'top_bn',
  'head/classifier': 'predictions',
}
_BN_WEIGHTS = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}


class ConversionError(ValueError):
  """The Keras weights cannot be converted (clear message, no traceback for the user)."""


def keras_file_name(variant: str) -> str:
  return f'efficientnet{variant}.h5'


def build_keras(
  variant: str, weights_path: str | None, num_classes: int = 1000, input_shape: tuple[int, int, int] | None = None
) -> keras.Model:
  """keras.applications.EfficientNet{variant} with weights from a local file, or ImageNet's if None."""
  constructor = getattr(keras.applications, f'EfficientNet{variant.upper()}')
  kind = f'keras.applications.EfficientNet{variant.upper()}'
  if weights_path is None:
    if num_classes != 1000:
      raise ConversionError(
        f'the ImageNet weights have 1000 classes; --num_classes {num_classes} needs --keras_weights'
      )
    try:
      return constructor(weights='imagenet', classifier_activation=None)
    except Exception as e:  # Keras raises a bare Exception when the download fails.
      name = keras_file_name(variant)
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConversionError(
        f'could not get the ImageNet weights of {kind} ({reason}). Without internet access, download '
        f'{KERAS_WEIGHTS_URL}{name} elsewhere, copy it here and rerun with --keras_weights {name}'
      ) from None
  if not os.path.isfile(weights_path):
    raise ConversionError(
      f'--keras_weights {weights_path}: no such file (expected e.g. '
      f'{keras_file_name(variant)} from {KERAS_WEIGHTS_URL})'
    )
  if not weights_path.endswith('.h5'):
    raise ConversionError(
      f'--keras_weights {weights_path}: expected a Keras weights file ending in .h5 '
      '(.h5 as Keras downloads it, or .weights.h5 from model.save_weights)'
    )
  model = constructor(weights=None, classes=num_classes, classifier_activation=None, input_shape=input_shape)
  try:
    with warnings.catch_warnings(record=True) as caught:  # a mismatched file warns once per layer
      warnings.simplefilter('always')
      model.load_weights(weights_path)
    skipped = [str(w.message) for w in caught if 'freshly-initialized' in str(w.message)]
    if skipped:
      raise ValueError(f'{len(skipped)} layers not found in the file ({skipped[0]})')
  except Exception as e:  # Keras/h5py raise assorted types on a mismatched file.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
      f'cannot load {weights_path} into {kind} with {num_classes} classes: {first}. '
      f'Is it a weights file of EfficientNet{variant.upper()} (check --variant and '
      '--num_classes)?'
    ) from None
  return model


def keras_arrays(keras_model: keras.Model) -> dict[str, np.ndarray]:
  """Every Keras variable as 'layer/weight' -> array (the Normalization layer as 'normalization/...')."""
  arrays = {}
  for layer in keras_model.layers:
    prefix = 'normalization' if isinstance(layer, keras.layers.Normalization) else layer.name
    for weight in layer.weights:
      arrays[f'{prefix}/{weight.name}'] = np.asarray(keras.ops.convert_to_numpy(weight))
  return arrays


def keras_source(name: str) -> str:
  """Keras 'layer/weight' of the Flax variable 'collection/module/.../leaf'."""
  collection, *modules, leaf = name.split('/')
  if collection == 'normalization':
    return f'normalization/{leaf}'
  module = '/'.join(modules)
  match = re.fullmatch(r'stage(\d+)_layer(\d+)/(.+)', module)
  if match and match[3] in _MBCONV_LAYERS:
    layer = f'block{match[1]}{chr(ord("a") + int(match[2]))}_{_MBCONV_LAYERS[match[3]]}'
  elif module in _OUTER_LAYERS:
    layer = _OUTER_LAYERS[module]
  else:
    raise ConversionError(f'Flax variable {name} has no Keras counterpart')
  return f'{layer}/{_BN_WEIGHTS[leaf] if module.endswith("bn") else leaf}'


def _to_flax_layout(array: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """Keras layout -> Flax layout: depthwise (k,k,C,1) -> (k,k,1,C); 1x1 conv (1,1,in,out) -> (in,out)."""
  if name.endswith('dwconv/kernel') and array.ndim == 4:
    return array.transpose(0, 1, 3, 2)
  if array.ndim == 4 and len(shape) == 2 and array.shape[:2] == (1, 1):
    return array.reshape(array.shape[2:])
  return array


def input_rescale(keras_model: keras.Model, variance: np.ndarray, mode: str = 'auto') -> np.ndarray:
  """The per-channel rescale after Normalization that Keras applies for ImageNet weights (else ones)."""
  rescalings = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Rescaling)]
  if not rescalings or not np.isclose(float(np.asarray(rescalings[0].scale)), 1 / 255):
    raise ConversionError('unexpected Keras model: its first layer is not Rescaling(1/255)')
  imagenet = np.asarray([1.0 / math.sqrt(s) for s in images_lib.IMAGENET_STD], np.float32)
  if mode == 'yes':
    return imagenet
  if mode == 'no':
    return np.ones(3, np.float32)
  if len(rescalings) > 1:  # built with weights='imagenet': take Keras's own constant
    return np.broadcast_to(np.asarray(rescalings[1].scale, np.float32), (3,)).copy()
  if np.allclose(variance, images_lib.IMAGENET_STD, rtol=0, atol=1e-6):
    return imagenet
  return np.ones(3, np.float32)


def convert(
  keras_model: keras.Model, variant: str, num_classes: int = 1000, imagenet_rescale: str = 'auto'
) -> tuple[efficientnet.EfficientNet, dict[str, Any]]:
  """(Flax model, variables) equal to `keras_model`; strict one-to-one mapping by layer name."""
  model = efficientnet.variant(variant, num_classes=num_classes)
  arrays = keras_arrays(keras_model)
  abstract = flax.traverse_util.flatten_dict(teacher.abstract_variables(model))
  flat, used = {}, {}
  for key, leaf in abstract.items():
    name = '/'.join(key)
    shape = tuple(leaf.shape)
    if name == 'normalization/rescale':
      continue
    source = keras_source(name)
    if source not in arrays:
      raise ConversionError(f'Flax variable {name} {shape}: Keras model has no {source}')
    if source in used:
      raise ConversionError(f'Keras variable {source} would fill both {used[source]} and {name}')
    array = _to_flax_layout(arrays[source], name, shape)
    if array.shape != shape:
      raise ConversionError(f'Flax variable {name} needs shape {shape}, Keras {source} has {arrays[source].shape}')
    flat[key] = array.astype(leaf.dtype)
    used[source] = name
  if ('normalization', 'rescale') in abstract:
    flat[('normalization', 'rescale')] = input_rescale(keras_model, arrays['normalization/variance'], imagenet_rescale)
  unused = [k for k in arrays if k not in used and k != 'normalization/count']
  if unused:
    raise ConversionError(
      f'Keras variable {unused[0]} {arrays[unused[0]].shape} has no Flax counterpart ({len(unused)} unused)'
    )
  return model, flax.traverse_util.unflatten_dict(flat)


def keras_taps(keras_model: keras.Model, model: efficientnet.EfficientNet) -> dict[str, str]:
  """Feature name -> Keras layer whose output it is (the last layer of every stage)."""
  taps = {'stem': 'stem_activation'}
  names = {layer.name for layer in keras_model.layers}
  for i, stage in enumerate(efficientnet.scaled_stages(model), start=1):
    last = f'block{i}{chr(ord("a") + stage.repeats - 1)}_'
    taps['stage1' if i == 1 else f'block{i - 1}'] = last + ('add' if last + 'add' in names else 'project_bn')
  return taps


def verify(
  keras_model: keras.Model,
  variant: str,
  model: efficientnet.EfficientNet,
  variables: dict[str, Any],
  resolution: int = VERIFY_RESOLUTION,
  batch: int = 2,
  seed: int = 0,
) -> dict[str, float]:
  """Max relative error (max |flax - keras| / max |keras|) of logits and every feature on random images.

  Runs a copy of the Keras model at `resolution` without Keras's extra ImageNet rescale, and the
  Flax model with rescale 1, so every mapped weight is compared.
  """
  reference = build_keras_like(keras_model, variant, model.num_classes, resolution)
  taps = keras_taps(reference, model)
  tapped = keras.Model(reference.input, [reference.output] + [reference.get_layer(n).output for n in taps.values()])
  images = np.random.default_rng(seed).uniform(0, 255, (batch, resolution, resolution, 3)).astype(np.float32)
  expected = [np.asarray(keras.ops.convert_to_numpy(t)) for t in tapped(images, training=False)]
  plain = {**variables, 'normalization': {**variables['normalization'], 'rescale': np.ones(3, np.float32)}}
  logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(plain, images)
  got = [logits] + [features[k] for k in taps]
  return {
    name: float(np.max(np.abs(np.asarray(g) - e)) / max(float(np.max(np.abs(e))), 1e-30))
    for name, g, e in zip(['logits', *taps], got, expected)
  }


def build_keras_like(keras_model: keras.Model, variant: str, num_classes: int, resolution: int) -> keras.Model:
  """A weights=None Keras model of the same variant at `resolution`, holding `keras_model`'s weights."""
  constructor = getattr(keras.applications, f'EfficientNet{variant.upper()}')
  reference = constructor(
    weights=None, classes=num_classes, classifier_activation=None, input_shape=(resolution, resolution, 3)
  )
  reference.set_weights(keras_model.get_weights())
  for layer in reference.layers:
    if isinstance(layer, keras.layers.Normalization):
      layer.finalize_state()  # set_weights alone leaves Normalization's cached mean/variance stale
  return reference


FLAGS = flags.FlagValues()
flags.DEFINE_enum(
  'variant', None, efficientnet.KERAS_VARIANTS, 'EfficientNet variant.', flag_values=FLAGS, case_sensitive=False
)
flags.DEFINE_string(
  'keras_weights',
  None,
  "Local Keras weights file (.h5/.weights.h5); default: Keras's weights='imagenet' download.",
  flag_values=FLAGS,
)
flags.DEFINE_string('out', None, 'Checkpoint directory to create (local path or gs://...).', flag_values=FLAGS)
flags.DEFINE_integer('resolution', 224, 'Resolution the teacher is run at (metadata).', flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1000, 'Classes of the classifier.', flag_values=FLAGS)
flags.DEFINE_enum(
  'imagenet_rescale',
  'auto',
  ('auto', 'yes', 'no'),
  "Keras's extra ImageNet input rescale: auto = as EfficientNetB*(weights='imagenet').",
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  'verify',
  True,
  f'Compare with Keras on random {VERIFY_RESOLUTION}x{VERIFY_RESOLUTION} images first.',
  flag_values=FLAGS,
)
flags.DEFINE_bool('overwrite', False, 'Replace a teacher checkpoint already in --out.', flag_values=FLAGS)
flags.mark_flags_as_required(['variant', 'out'], flag_values=FLAGS)


def main(argv: list[str]) -> int:
  """Converts, verifies against Keras, writes; errors are one clear line on stderr (see cli.py)."""
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  variant = FLAGS.variant
  out = workdir_lib.as_path(FLAGS.out)
  if out.exists() and any(out.iterdir()) and not FLAGS.overwrite:
    raise ConversionError(f'--out {FLAGS.out} exists and is not empty; choose another directory or pass --overwrite')
  if FLAGS.resolution < 32 or FLAGS.num_classes < 1:
    raise ConversionError('--resolution must be >= 32 and --num_classes >= 1')
  keras_model = build_keras(variant, FLAGS.keras_weights, FLAGS.num_classes)
  model, variables = convert(keras_model, variant, FLAGS.num_classes, FLAGS.imagenet_rescale)
  if FLAGS.verify:
    errors = verify(keras_model, variant, model, variables)
    print(' '.join(f'{k}={v:.1e}' for k, v in errors.items()))
    worst = max(errors, key=errors.get)
    if errors[worst] > VERIFY_TOLERANCE:
      raise ConversionError(
        f'converted model disagrees with Keras: {worst} relative error {errors[worst]:.2e} '
        f'> {VERIFY_TOLERANCE}; nothing written'
      )
  rescale = variables['normalization']['rescale']
  metadata = {
    'variant': variant,
    'resolution': FLAGS.resolution,
    'num_classes': FLAGS.num_classes,
    'imagenet_rescale': bool(not np.allclose(rescale, 1.0)),
    'source': FLAGS.keras_weights or KERAS_WEIGHTS_URL + keras_file_name(variant),
    'keras_version': keras.__version__,
  }
  path = teacher.save(FLAGS.out, model, variables, metadata, overwrite=FLAGS.overwrite)
  count = sum(int(np.size(x)) for x in jax.tree.leaves(variables))
  print(
    f'wrote EfficientNet{variant.upper()} teacher ({count:,} values, input 0..255 RGB, ImageNet rescale '
    f'{"on" if metadata["imagenet_rescale"] else "off"}) to {path}'
  )
  return 0


if __name__ == '__main__':
  cli.run(main, FLAGS)
