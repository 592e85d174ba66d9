"""The export stage: a child checkpoint as a SavedModel or TFLite file for deployment.

Export goes through jax2tf (native serialization; TFLite converts it with builtin ops only). The
exported function takes float32 0..255 RGB images of the checkpoint's size (NHWC), normalises them
inside as the net expects and returns logits; SavedModels take any batch size, TFLite batch 1.
As a stage it writes WORKDIR/export/model.tflite (and/or saved_model/, `export.formats`) from
`export.checkpoint` or WORKDIR/retrain/final. Standalone:
  python -m dna_jax.stages.export --workdir DIR --format tflite|saved_model [--checkpoint DIR] [--out PATH]
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import os
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dna_jax import checkpoints
from dna_jax import cli
from dna_jax import images as images_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import layers

FORMATS = ('saved_model', 'tflite')


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

  def predict(pixels):
    x = pixels.astype(jnp.float32)
    if normalization is not None:
      x = images_lib.normalize(x, 'raw', normalization)
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
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(_to_tflite(module))
  return path


def _to_tflite(module: Any) -> bytes:
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
  return converter.convert()


def tflite_bytes(predict: Callable[[jax.Array], jax.Array], input_shape: tuple[int, ...]) -> bytes:
  """A TFLite flatbuffer of any float32 function of one float32 input (latency tables time pieces of nets)."""
  from jax.experimental import jax2tf
  import tensorflow as tf

  converted = jax2tf.convert(predict, with_gradient=False)
  module = tf.Module()
  spec = [tf.TensorSpec(input_shape, tf.float32, name='x')]
  module.serve = tf.function(lambda x: {'y': converted(x)}, autograph=False, input_signature=spec)
  return _to_tflite(module)


def default_checkpoint(workdir: str) -> str:
  """The retrain stage's final (EMA) child checkpoint, else its best one."""
  paths = workdir_lib.Workdir(workdir)
  for path in (paths.retrain_final, paths.retrain_best):
    if checkpoints.is_child(path):
      return os.fspath(path)
  raise FileNotFoundError(
    f'no retrained checkpoint in {paths.retrain_final} or {paths.retrain_best}; run stages=retrain first '
    'or pass --checkpoint DIR'
  )


def export_checkpoint(checkpoint: str, out: str, format: str) -> dict[str, Any]:
  """Exports a child checkpoint to `out` (float32 0..255 RGB input, normalised inside); returns its meta."""
  # Native depthwise convs: the exported graph runs on the deployment device, not this host.
  model, variables, meta = checkpoints.load_child(checkpoint, depthwise='native')
  export(model, variables, int(meta['image_size']), out, format, normalization=meta['normalization'])
  return meta


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The export stage: export.checkpoint (or WORKDIR/retrain/final) to WORKDIR/export in export.formats."""
  formats = [f.strip() for f in config.export.formats.split(',') if f.strip()]
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f'export.formats={config.export.formats!r}: choose from {", ".join(FORMATS)}')
  checkpoint = config.export.checkpoint or default_checkpoint(workdir)
  written = {}
  if jax.process_index() == 0:
    for format in formats:
      written[format] = os.fspath(workdir_lib.Workdir(workdir).export(format))
      export_checkpoint(checkpoint, written[format], format)
      logging.info('Exported %s to %s.', checkpoint, written[format])
  return {'checkpoint': checkpoint, **written}


FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'Workdir of a finished retrain stage.', flag_values=FLAGS)
flags.DEFINE_enum('format', 'tflite', FORMATS, 'Export format.', flag_values=FLAGS)
flags.DEFINE_string(
  'checkpoint', None, 'Child checkpoint directory (default: WORKDIR/retrain/final or best).', flag_values=FLAGS
)
flags.DEFINE_string(
  'out', None, 'Output path (default: WORKDIR/export/model.tflite or WORKDIR/export/saved_model).', flag_values=FLAGS
)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  if not FLAGS.checkpoint and not FLAGS.workdir:
    raise ValueError('give --workdir (a retrained workdir) or --checkpoint (a child checkpoint directory)')
  checkpoint = FLAGS.checkpoint or default_checkpoint(FLAGS.workdir)
  if FLAGS.out:
    out = FLAGS.out
  elif FLAGS.workdir:
    out = os.fspath(workdir_lib.Workdir(FLAGS.workdir).export(FLAGS.format))
  else:
    out = os.path.join(checkpoint, 'export', 'model.tflite' if FLAGS.format == 'tflite' else 'saved_model')
  meta = export_checkpoint(checkpoint, out, FLAGS.format)
  print(f'Wrote {out} ({meta["arch"]}, input float32 0..255 RGB {meta["image_size"]}x{meta["image_size"]}).')


if __name__ == '__main__':
  cli.run(main, FLAGS)
