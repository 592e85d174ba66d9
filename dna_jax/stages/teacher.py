"""The demo-only teacher stage: trains a small EfficientNet teacher on the configured data.

DNA distils from an ImageNet-trained EfficientNet-B7 (converted with `dna_jax.convert_teacher`); on a
small dataset without such weights this stage trains one first (config.teacher.variant, usually
'tiny') with the classifier trainer and the recipe in config.teacher.training. The EMA weights are
written as a teacher checkpoint (teacher.py) in config.teacher.checkpoint or WORKDIR/teacher;
training checkpoints live in WORKDIR/teacher_training.

The teacher takes images as the input pipeline gives them (data.normalization; no Keras input
normalisation inside), which is also what the distill stage feeds it.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections

from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import teacher as teacher_lib
from dna_jax import trainer
from dna_jax import workdir as workdir_lib
from dna_jax.models import efficientnet
from dna_jax.models import layers

TRAINED_BY = 'dna_jax.train_teacher'


def teacher_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.teacher.checkpoint or os.fspath(workdir_lib.Workdir(workdir).teacher)


def teacher_model(config: ml_collections.ConfigDict, num_classes: int, bn_axis_name: str | None = None) -> Any:
  """The demo teacher as this stage trains it (`bn_axis_name` set) and saves it (None)."""
  conventions = layers.conventions_from_config(
    config.model.to_dict() | {'padding': 'tf_same', 'bn_epsilon': 1e-3, 'bn_momentum': config.model.bn_momentum}
  )
  return efficientnet.variant(
    efficientnet.variant_name(config.teacher.variant),
    bn_axis_name=bn_axis_name,
    num_classes=num_classes,
    stem_stride=config.teacher.stem_stride,
    keras_input=False,
    conventions=conventions,
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the teacher, writes its checkpoint and returns its eval top-1/top-5 (EMA and raw weights)."""
  tc = config.teacher.training
  if tc.epochs <= 0:
    raise ValueError('stages=teacher needs teacher.training.epochs > 0 (it trains a demo teacher on the data)')
  directory = teacher_directory(config, workdir)
  if (workdir_lib.as_path(directory) / teacher_lib.METADATA_FILE).exists():
    existing = teacher_lib.read_metadata(directory)
    if existing.get('trained_by') != TRAINED_BY:
      raise ValueError(
        f'{directory} already holds a teacher not made by the teacher stage; refusing to overwrite '
        'it (remove teacher from config.stages or point teacher.checkpoint elsewhere)'
      )
  parallel.check_global_batch(tc.batch_size, 'teacher.training.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  variant = efficientnet.variant_name(config.teacher.variant)
  model = teacher_model(config, num_classes, bn_axis_name=parallel.AXIS)
  data = trainer.dataset(config.data, tc)
  state, results = trainer.train_and_evaluate(
    model, tc, workdir_lib.Workdir(workdir).teacher_training, data, seed=config.seed
  )
  final = results['final']
  metadata = {
    'variant': variant,
    'trained_by': TRAINED_BY,
    'dataset': config.data.dataset,
    'image_size': data.image_size,
    'normalization': config.data.normalization,
    'epochs': tc.epochs,
    'weights': 'ema',
    'eval_top1': final['ema']['top1'],
    'eval_top5': final['ema']['top5'],
  }
  teacher_lib.save(
    directory,
    teacher_model(config, num_classes),
    trainer.variables_of(state, ema=True),
    metadata,
    overwrite=True,
  )
  logging.info(
    'Teacher %s written to %s: eval top-1 %.2f%% (EMA), %.2f%% (raw).',
    variant,
    directory,
    100 * final['ema']['top1'],
    100 * final['raw']['top1'],
  )
  return {
    'directory': directory,
    'top1': final['ema']['top1'],
    'top5': final['ema']['top5'],
    'top1_raw': final['raw']['top1'],
    'top5_raw': final['raw']['top5'],
  }
