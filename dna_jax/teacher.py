"""The frozen teacher: checkpoint format, start-up check, loading and its pure forward.

A teacher checkpoint is a directory (local or gs://) holding
  variables/      an Orbax (StandardCheckpointer) checkpoint of the Flax variables:
                  'params', 'batch_stats' and, for keras_input models, 'normalization'
  teacher.json    metadata: variant, model overrides, input convention, resolution, ...
written by `python -m dna_jax.convert_teacher` (Keras ImageNet weights) or by `save`
(the demo teacher stage). `teacher.json` is written last: its presence marks a complete
checkpoint.

Input convention: 'raw' teachers (every converted Keras model) take 0..255 RGB pixels and
normalise inside, as Keras does (the input pipeline's normalization='raw' feeds them);
'normalized' teachers take already normalised images.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from etils import epath
import flax
import jax
import jax.numpy as jnp

from dna_jax import checkpoints
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import efficientnet

Array = jax.Array
METADATA_FILE = 'teacher.json'
FORMAT = 'dna_jax.teacher.v1'
# Model attributes a checkpoint may override on top of its named variant.
MODEL_OVERRIDES = ('num_classes', 'stem_stride', 'keras_input')


class TeacherCheckpointError(ValueError):
  """A teacher checkpoint is missing, incomplete or not the expected model."""


def _path(directory: str | os.PathLike[str]) -> epath.Path:
  if not os.fspath(directory):
    raise TeacherCheckpointError('no teacher checkpoint directory given (config.teacher.checkpoint is empty)')
  return workdir_lib._path(directory)


def build_model(metadata: Mapping[str, Any], **overrides: Any) -> efficientnet.EfficientNet:
  """The model a checkpoint's metadata describes."""
  fields = {k: v for k, v in metadata.get('model', {}).items() if k in MODEL_OVERRIDES}
  return efficientnet.variant(metadata['variant'], **{**fields, **overrides})


def abstract_variables(model: efficientnet.EfficientNet, image_size: int = 32) -> dict[str, Any]:
  """Shapes and dtypes of `model`'s variables (traced, never compiled or computed)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def save(
  directory: str | os.PathLike[str],
  model: efficientnet.EfficientNet,
  variables: Mapping[str, Any],
  metadata: Mapping[str, Any],
  overwrite: bool = False,
) -> epath.Path:
  """Writes `variables` and metadata (must hold 'variant') as a teacher checkpoint in `directory`."""
  if 'variant' not in metadata:
    raise ValueError("teacher metadata needs a 'variant' entry")
  path = _path(directory)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise TeacherCheckpointError(f'{path} exists and is not empty; choose another directory or pass --overwrite')
  meta = {
    'format': FORMAT,
    **metadata,
    'model': {k: getattr(model, k) for k in MODEL_OVERRIDES},
    'input': 'raw' if model.keras_input else 'normalized',
    'block_widths': list(efficientnet.block_widths(model)),
  }
  return checkpoints.save_variables(path, variables, meta, METADATA_FILE)


def read_metadata(directory: str | os.PathLike[str], expected: str = '') -> dict[str, Any]:
  """The metadata of a complete teacher checkpoint, or a clear error."""
  path = _path(directory)
  want = f' (expected EfficientNet variant {expected!r})' if expected else ''
  if expected and expected not in efficientnet.KERAS_VARIANTS:
    hint = '; train it with the teacher stage (config.stages=teacher,...)'
  else:
    hint = (
      f'; create it with: python -m dna_jax.convert_teacher --variant {expected or "b7"} '
      f'--keras_weights efficientnet{expected or "b7"}.h5 --out {directory}'
    )
  if not (path / METADATA_FILE).exists():
    state = 'does not exist' if not path.exists() else f'has no {METADATA_FILE} (missing or incomplete)'
    raise TeacherCheckpointError(f'teacher checkpoint {path} {state}{want}{hint}')
  try:
    metadata = json.loads((path / METADATA_FILE).read_text())
  except json.JSONDecodeError as e:
    raise TeacherCheckpointError(f'{path / METADATA_FILE} is not valid JSON: {e}') from None
  if not isinstance(metadata, dict) or 'variant' not in metadata:
    raise TeacherCheckpointError(f"{path / METADATA_FILE} has no 'variant' field{want}")
  return metadata


def check(directory: str | os.PathLike[str], variant: str) -> dict[str, Any]:
  """Fails early (no compile, no weights read) unless `directory` holds teacher `variant`.

  Checks the metadata's variant, then every variable's presence and shape against the model the
  variant defines. Returns the metadata.
  """
  expected = efficientnet.variant_name(variant)
  metadata = read_metadata(directory, expected)
  path = _path(directory)
  found = str(metadata['variant']).lower()
  if found != expected:
    raise TeacherCheckpointError(
      f'teacher checkpoint {path} holds EfficientNet variant {found!r}, expected {expected!r} '
      f'(config teacher.variant); convert the right weights or point teacher.checkpoint elsewhere'
    )
  try:
    have_shapes = checkpoints.stored_shapes(path)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise TeacherCheckpointError(f'cannot read the variables of teacher checkpoint {path}: {e}') from None
  want_shapes = {
    '/'.join(k): tuple(v.shape)
    for k, v in flax.traverse_util.flatten_dict(abstract_variables(build_model(metadata))).items()
  }
  for name, shape in sorted(want_shapes.items(), key=lambda item: not item[0].startswith('params/')):
    if name not in have_shapes:
      raise TeacherCheckpointError(f'teacher checkpoint {path} lacks {name} {shape} of EfficientNet {expected!r}')
    if have_shapes[name] != shape:
      raise TeacherCheckpointError(
        f'teacher checkpoint {path}: {name} has shape {have_shapes[name]}, EfficientNet {expected!r} needs {shape}'
      )
  extra = sorted(set(have_shapes) - set(want_shapes))
  if extra:
    raise TeacherCheckpointError(
      f'teacher checkpoint {path} has {extra[0]} {have_shapes[extra[0]]}, which EfficientNet {expected!r} does not have'
    )
  return metadata


def load(
  directory: str | os.PathLike[str], variant: str = '', **overrides: Any
) -> tuple[efficientnet.EfficientNet, dict[str, Any]]:
  """(model, variables) of a teacher checkpoint, variables on the default device.

  With `variant`, `check` runs first; otherwise the checkpoint's own variant is used. `overrides` are
  model attributes that leave the variables' shapes alone (e.g. conventions, bn_axis_name).
  """
  metadata = check(directory, variant) if variant else read_metadata(directory)
  model = build_model(metadata, **overrides)
  target = abstract_variables(model)
  restored = checkpoints.load_variables(_path(directory), target)
  return model, jax.device_put(restored)


def teacher_features(
  model: efficientnet.EfficientNet,
  variables: Mapping[str, Any],
  images: Array,
  up_to: int | None = None,
  train_mode_bn: bool = False,
  mask: Array | None = None,
) -> dict[str, Array]:
  """Teacher features of `images` without gradients; pure, usable inside jit/pmap/shard_map.

  Inference mode by default (BN running statistics, no dropout or drop-connect). `train_mode_bn`
  reproduces the authors' distillation: BatchNorm normalises with the batch's own statistics (per
  device inside pmap/shard_map), counting only the examples `mask` (N,) marks, so that padding never
  changes a statistic; running statistics are not updated. `up_to=k` stops after DNA block k.
  """
  model = model.clone(up_to=up_to, dropout_rate=0.0, drop_connect_rate=0.0)
  variables = jax.lax.stop_gradient(variables)
  if train_mode_bn:
    (_, features), _ = model.apply(variables, images, train=True, mask=mask, mutable=['batch_stats'])
  else:
    _, features = model.apply(variables, images, train=False)
  return jax.lax.stop_gradient(features)


def recalibrated(
  model: efficientnet.EfficientNet, variables: Mapping[str, Any], images: Array, up_to: int | None = None
) -> dict[str, Any]:
  """`variables` with every BatchNorm's running statistics replaced by those of `images`.

  The authors' rating teacher: its BatchNorm recalibrated on the calibration batch (their `reset_bn_eval`),
  then run in inference mode. Statistics are over the whole batch as jit sees it (every device).
  """
  conventions = dataclasses.replace(model.conventions, bn_momentum=0.0)
  model = model.clone(up_to=up_to, dropout_rate=0.0, drop_connect_rate=0.0, conventions=conventions)
  _, updates = model.apply(jax.lax.stop_gradient(variables), images, train=True, mutable=['batch_stats'])
  stats = flax.core.unfreeze(variables['batch_stats'])
  merged = flax.traverse_util.flatten_dict(stats)
  merged.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(updates['batch_stats'])))
  return {**variables, 'batch_stats': flax.traverse_util.unflatten_dict(merged)}


def load_for_run(config: Any, workdir: str) -> tuple[efficientnet.EfficientNet, dict[str, Any]]:
  """The frozen teacher a run's config names: teacher.checkpoint, or the one the teacher stage trained."""
  directory = config.teacher.checkpoint or os.fspath(workdir_lib.Workdir(workdir).teacher)
  check(directory, config.teacher.variant)
  return load(directory)


def check_space(space: space_lib.SearchSpace, model: efficientnet.EfficientNet, stem_stride: int) -> None:
  """Every block of the space must match the width and stride of the teacher stage it is cut at."""
  if model.stem_stride != stem_stride:
    raise ValueError(
      f"space.stem_stride={stem_stride} but the teacher's stem stride is {model.stem_stride}: "
      'student and teacher blocks would not have the same resolution'
    )
  widths = efficientnet.block_widths(model)
  strides = efficientnet.block_strides(model)
  if len(widths) < len(space.blocks):
    raise ValueError(
      f'the space has {len(space.blocks)} blocks but the teacher has only {len(widths)} distillable stages'
    )
  for k, block in enumerate(space.blocks):
    if block.teacher_width != widths[k] or block.stride != strides[k]:
      raise ValueError(
        f'space block {k + 1} expects teacher width {block.teacher_width} and stride {block.stride}, '
        f'but teacher block {k + 1} has width {widths[k]} and stride {strides[k]}'
      )
