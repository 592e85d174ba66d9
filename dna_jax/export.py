"""Child-network checkpoints (save/load with meta.json) and export for deployment.

A child checkpoint is a directory holding
  meta.json    {'arch': str (space.to_string), 'num_classes': int, 'image_size': int,
                'stem_stride': int, 'conventions': {'padding', 'bn_epsilon', 'bn_momentum'},
                'normalization': 'raw' | 'unit' | 'imagenet', ...free extra keys}
  variables/   an Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
written by the retrain stage (`final/`, `best/`) and by `dna_jax.convert_authors`.
`normalization` is what the net expects: 'raw' 0..255 RGB, 'unit' 0..1, 'imagenet'
(x/255 - mean) / std with the ImageNet channel statistics.

Export (jax2tf, native serialization; TFLite converts it with builtin ops only):
  python -m dna_jax.export --workdir DIR --format tflite|saved_model [--checkpoint DIR] [--out PATH]
The exported function takes float32 0..255 RGB images of the checkpoint's size (NHWC),
normalises inside and returns logits; SavedModels take any batch size, TFLite batch 1.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
from etils import epath
import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dna_jax import files
from dna_jax import space as space_lib
from dna_jax.models import child
from dna_jax.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('raw', 'unit', 'imagenet')
META_FILE = 'meta.json'
VARIABLES_DIR = 'variables'
FORMATS = ('saved_model', 'tflite')


def normalize(images: Any, source: str, target: str) -> Any:
  """Converts images between normalizations ('raw' 0..255, 'unit' 0..1, 'imagenet')."""
  for name in (source, target):
    if name not in NORMALIZATIONS:
      raise ValueError(f'unknown normalization {name!r}; valid: {", ".join(NORMALIZATIONS)}')
  if source == target:
    return images
  mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
  unit = {'raw': lambda x: x / 255.0, 'unit': lambda x: x, 'imagenet': lambda x: x * std + mean}[source](images)
  return {'raw': lambda x: x * 255.0, 'unit': lambda x: x, 'imagenet': lambda x: (x - mean) / std}[target](unit)


def make_meta(
  arch: space_lib.Architecture,
  num_classes: int,
  image_size: int,
  conventions: layers.Conventions,
  normalization: str,
  stem_stride: int = 2,
  **extra: Any,
) -> dict[str, Any]:
  """The meta.json content of a child checkpoint."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'unknown normalization {normalization!r}; valid: {", ".join(NORMALIZATIONS)}')
  return {
    'arch': space_lib.to_string(arch),
    'num_classes': int(num_classes),
    'image_size': int(image_size),
    'stem_stride': int(stem_stride),
    'conventions': {
      'padding': conventions.padding,
      'bn_epsilon': conventions.bn_epsilon,
      'bn_momentum': conventions.bn_momentum,
    },
    'normalization': normalization,
    **extra,
  }


def model_from_meta(
  meta: Mapping[str, Any], *, dtype: Any = jnp.float32, depthwise: str = 'auto', bn_axis_name: str | None = None
) -> child.ChildNet:
  """The ChildNet (inference settings: no dropout/drop-connect) described by a meta dict."""
  missing = [k for k in ('arch', 'num_classes', 'image_size', 'conventions', 'normalization') if k not in meta]
  if missing:
    raise ValueError(f'child checkpoint meta lacks {", ".join(missing)}')
  conv = meta['conventions']
  conventions = layers.Conventions(
    padding=conv['padding'],
    bn_epsilon=float(conv['bn_epsilon']),
    bn_momentum=float(conv.get('bn_momentum', 0.99)),
    depthwise=depthwise,
    dtype=dtype,
  )
  return child.ChildNet(
    space_lib.from_string(meta['arch']),
    int(meta['num_classes']),
    dropout_rate=0.0,
    drop_connect_rate=0.0,
    stem_stride=int(meta.get('stem_stride', 2)),
    conventions=conventions,
    bn_axis_name=bn_axis_name,
  )


def _path(directory: str) -> epath.Path:
  """Local paths made absolute (Orbax needs it); gs:// and other URLs unchanged."""
  text = os.fspath(directory)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def save_child_checkpoint(directory: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes `variables` ({'params', 'batch_stats'}) and meta.json to `directory`, replacing what is there.

  meta.json is written last: its presence marks a complete checkpoint. Call on every process.
  """
  path = _path(directory)
  model_from_meta(meta)  # validates the meta before anything is written
  host = jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x),
    {'params': variables['params'], 'batch_stats': variables['batch_stats']},
  )
  if jax.process_index() == 0:
    if (path / META_FILE).exists():
      (path / META_FILE).unlink()
    if (path / VARIABLES_DIR).exists():
      (path / VARIABLES_DIR).rmtree()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES_DIR, host)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    files.atomic_write_text(path / META_FILE, json.dumps(dict(meta), indent=1))


def load_child_checkpoint(
  directory: str, *, dtype: Any = jnp.float32, depthwise: str = 'auto', bn_axis_name: str | None = None
) -> tuple[child.ChildNet, dict[str, Any], dict[str, Any]]:
  """(model, variables, meta) of a child checkpoint directory (see the module docstring)."""
  path = _path(directory)
  if not (path / META_FILE).exists() or not (path / VARIABLES_DIR).exists():
    raise FileNotFoundError(
      f'{directory} is not a child checkpoint: expected {META_FILE} and {VARIABLES_DIR}/ '
      '(written by the retrain stage or dna_jax.convert_authors)'
    )
  meta = json.loads((path / META_FILE).read_text())
  model = model_from_meta(meta, dtype=dtype, depthwise=depthwise, bn_axis_name=bn_axis_name)
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(path / VARIABLES_DIR)
  checkpointer.close()
  expected = jax.eval_shape(lambda: child.init_child(model, jax.random.PRNGKey(0), int(meta['image_size'])))
  got = {'/'.join(k): tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(variables).items()}
  want = {'/'.join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(dict(expected)).items()}
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise ValueError(
        f'{directory}: variable {name} is {got.get(name, "missing")}, but the architecture '
        f'{meta["arch"]!r} of its meta.json needs {want.get(name, "no such variable")}'
      )
  return model, variables, meta


def _dense_as_conv(next_fun, args, kwargs, context):
  """Flax interceptor: Dense layers on NHWC input (the 1x1 convs and SE) run as 1x1 convolutions.

  TFLite's converter lowers a Dense over NHWC input to a rank-4 batch_matmul, which it then rejects
  (also after a reshape to 2-D when H = W = 1); a 1x1 convolution becomes its CONV_2D. Same numbers.
  """
  module = context.module
  if not (isinstance(module, nn.Dense) and context.method_name == '__call__' and args[0].ndim == 4):
    return next_fun(*args, **kwargs)
  x = args[0].astype(jnp.float32)
  kernel = module.get_variable('params', 'kernel').astype(jnp.float32)
  y = lax.conv_general_dilated(x, kernel[None, None], (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(jnp.float32)
  return y


def inference_fn(
  model: Any, variables: Mapping[str, Any], normalization: str | None = None
) -> Callable[[jax.Array], jax.Array]:
  """images -> logits in inference mode; with `normalization`, images are 0..255 and normalised inside."""

  def predict(images):
    x = images.astype(jnp.float32)
    if normalization is not None:
      x = normalize(x, 'raw', normalization)
    with nn.intercept_methods(_dense_as_conv):
      return model.apply(variables, x, train=False)[0].astype(jnp.float32)

  return predict


def export(
  model: Any,
  variables: Mapping[str, Any],
  image_size: int,
  path: str,
  format: str = 'saved_model',
  *,
  normalization: str | None = None,
  batch_size: int | None = None,
) -> str:
  """Writes the inference net as a SavedModel directory or a .tflite file at `path`; returns `path`.

  The input is float32 (batch, image_size, image_size, 3): 0..255 pixels if `normalization` is given
  (it is applied inside), else already in the model's normalization. `batch_size` None: polymorphic
  batch for SavedModel, 1 for TFLite.
  """
  if format not in FORMATS:
    raise ValueError(f'unknown export format {format!r}; valid: {", ".join(FORMATS)}')
  from jax.experimental import jax2tf
  import tensorflow as tf  # Deferred: only export needs TensorFlow.

  if format == 'tflite' and batch_size is None:
    batch_size = 1
  variables = jax.tree.map(np.asarray, {'params': variables['params'], 'batch_stats': variables['batch_stats']})
  if isinstance(getattr(model, 'conventions', None), layers.Conventions):
    # Grouped convolutions: what TFLite and accelerators run natively (not this host's shift-and-add).
    model = model.clone(conventions=dataclasses.replace(model.conventions, depthwise='native'))
  predict = inference_fn(model, variables, normalization)
  polymorphic = None if batch_size else ['(b, _, _, _)']
  # A SavedModel may be served on any backend; TFLite lowers the module to its own ops.
  platforms = ('cpu', 'cuda', 'tpu') if format == 'saved_model' else None
  converted = jax2tf.convert(
    predict, with_gradient=False, polymorphic_shapes=polymorphic, native_serialization_platforms=platforms
  )
  signature = [tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32, name='images')]
  module = tf.Module()
  module.serve = tf.function(lambda images: {'logits': converted(images)}, autograph=False, input_signature=signature)
  if format == 'saved_model':
    tf.saved_model.save(module, path, signatures={'serving_default': module.serve.get_concrete_function()})
    return path
  converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(converter.convert())
  return path


def default_checkpoint(workdir: str) -> str:
  """The retrain stage's final (EMA) child checkpoint, else its best one."""
  for name in ('final', 'best'):
    path = epath.Path(workdir) / 'retrain' / name
    if (path / META_FILE).exists():
      return os.fspath(path)
  raise FileNotFoundError(
    f'no retrained checkpoint under {workdir}/retrain/{{final,best}}; run stages=retrain first or pass --checkpoint DIR'
  )


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.checkpoint and not FLAGS.workdir:
    raise app.UsageError('give --workdir (a retrained workdir) or --checkpoint (a child checkpoint directory)')
  checkpoint = FLAGS.checkpoint or default_checkpoint(FLAGS.workdir)
  # Native depthwise convs: the exported graph runs on the deployment device, not this host.
  model, variables, meta = load_child_checkpoint(checkpoint, depthwise='native')
  out = FLAGS.out or os.path.join(
    FLAGS.workdir or checkpoint, 'export', 'model.tflite' if FLAGS.format == 'tflite' else 'saved_model'
  )
  export(model, variables, int(meta['image_size']), out, FLAGS.format, normalization=meta['normalization'])
  print(f'Wrote {out} ({meta["arch"]}, input float32 0..255 RGB {meta["image_size"]}x{meta["image_size"]}).')


def define_flags() -> None:
  """Command-line flags of `python -m dna_jax.export` (defined only there, not on import)."""
  flags.DEFINE_string('workdir', None, 'Workdir of a finished retrain stage.')
  flags.DEFINE_enum('format', 'tflite', FORMATS, 'Export format.')
  flags.DEFINE_string('checkpoint', None, 'Child checkpoint directory (default: WORKDIR/retrain/final or best).')
  flags.DEFINE_string('out', None, 'Output path (default: WORKDIR/export/model.tflite or WORKDIR/export/saved_model).')


if __name__ == '__main__':
  define_flags()
  app.run(main)
