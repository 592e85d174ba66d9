"""The demo-only `teacher` stage: trains a small EfficientNet teacher on the configured data.

DNA distils from an ImageNet-trained EfficientNet-B7 (converted with `dna_jax.convert_teacher`);
on a small dataset without such weights this stage trains one first (config.teacher.variant,
usually 'tiny') with the retrain stage's loop (`retrain.train_and_evaluate`): Adam with coupled
L2 weight decay, linear warm-up then cosine, label smoothing 0.1, EMA of the weights. The EMA
weights are written as a teacher checkpoint (`teacher.save`) in config.teacher.checkpoint or
WORKDIR/teacher; training checkpoints live in WORKDIR/teacher_training.

The teacher takes images as the input pipeline gives them (data.normalization; no Keras input
normalisation inside), which is also what the distillation stage feeds it.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from dna_jax import parallel
from dna_jax import retrain
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.models import layers

TRAINED_BY = 'dna_jax.train_teacher'


def teacher_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The retrain-style recipe of the teacher, from config.teacher (and logging/parallel from config.retrain)."""
  t, r = config.teacher, config.retrain
  if t.epochs <= 0:
    raise ValueError('stages=teacher needs teacher.epochs > 0 (it trains a demo teacher on the data)')
  return ml_collections.ConfigDict(
    dict(
      epochs=t.epochs,
      batch_size=t.batch_size,
      steps_per_epoch=t.steps_per_epoch,
      optimizer='adam',
      base_learning_rate=t.learning_rate * 256 / t.batch_size,
      warmup_epochs=min(1.0, t.epochs / 10),
      schedule='cosine',
      lr_decay=0.97,
      lr_decay_epochs=2.4,
      rms_decay=0.9,
      rms_epsilon=1e-3,
      momentum=0.9,
      weight_decay=t.weight_decay,
      label_smoothing=0.1,
      ema_decay=0.999,
      parallel=r.parallel,
      checkpoint_every_steps=r.checkpoint_every_steps,
      keep_checkpoints=2,
      log_every_steps=r.log_every_steps,
      eval_every_epochs=0,
    )
  )


def teacher_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.teacher.checkpoint or os.fspath(epath.Path(workdir) / 'teacher')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the teacher, writes its checkpoint and returns its eval top-1/top-5 (EMA and raw weights)."""
  from dna_jax import input_pipeline

  tc = teacher_train_config(config)
  directory = teacher_directory(config, workdir)
  path = teacher_lib.as_path(directory)
  if (path / teacher_lib.METADATA_FILE).exists():
    existing = teacher_lib.read_metadata(directory)
    if existing.get('trained_by') != TRAINED_BY:
      raise ValueError(
        f'{directory} already holds a teacher not made by the teacher stage; refusing to overwrite '
        'it (remove teacher from config.stages or point teacher.checkpoint elsewhere)'
      )
  parallel.check_global_batch(tc.batch_size, 'teacher.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  image_size = config.data.image_size
  variant = efficientnet.variant_name(config.teacher.variant)
  overrides = dict(
    num_classes=num_classes,
    stem_stride=config.teacher.stem_stride,
    keras_input=False,
    conventions=layers.conventions_from_config(
      config.model.to_dict() | {'padding': 'tf_same', 'bn_epsilon': 1e-3, 'bn_momentum': config.model.bn_momentum}
    ),
  )
  model = efficientnet.variant(variant, bn_axis_name=parallel.AXIS, **overrides)
  state, results = retrain.train_and_evaluate(
    model,
    tc,
    os.fspath(epath.Path(workdir) / 'teacher_training'),
    image_size=image_size,
    steps_per_epoch=retrain.steps_per_epoch(tc, config.data),
    seed=config.seed,
    train_batches=lambda start: input_pipeline.create_split(config.data, 'train', tc.batch_size, start_step=start),
    eval_batches=lambda: input_pipeline.create_split(config.data, 'eval', tc.batch_size),
  )
  final = results['final']
  metadata = {
    'variant': variant,
    'trained_by': TRAINED_BY,
    'dataset': config.data.dataset,
    'image_size': image_size,
    'normalization': config.data.normalization,
    'epochs': tc.epochs,
    'weights': 'ema',
    'eval_top1': final['ema']['top1'],
    'eval_top5': final['ema']['top5'],
  }
  teacher_lib.save(
    directory,
    efficientnet.variant(variant, **overrides),
    parallel.host_copy(retrain.variables_of(state, ema=True)),
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
