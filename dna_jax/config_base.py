"""The full default configuration that every config file starts from.

Config files under configs/ call `get_base_config()` and override a few fields
(the flax examples' `configs/default.py` pattern, kept inside the package so that a
config file loads from any working directory).
"""

from __future__ import annotations

import ml_collections

from dna_jax import input_pipeline

STAGES = ('teacher', 'distill', 'rate', 'search', 'retrain', 'evaluate', 'fidelity')


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Comma-separated, run in the order of STAGES; finished stages are skipped on rerun.
  config.stages = 'distill,rate,search'

  config.data = input_pipeline.get_data_config()

  # Numerical conventions of the student/child nets (see models.layers.Conventions).
  config.model = ml_collections.ConfigDict(
    dict(padding='tf_same', bn_epsilon=1e-3, bn_momentum=0.99, depthwise='auto', dtype='float32')
  )

  # A named space ('imagenet') or blocks written as 'STRIDE TEACHER_WIDTH CELLS; ...',
  # e.g. '2 48 2@24,3@24; 2 80 2@40,3@40' (see space.parse_space).
  config.space = ml_collections.ConfigDict(
    dict(blocks='imagenet', stem_width=32, ds_width=16, head_width=1280, stem_stride=2)
  )

  config.teacher = ml_collections.ConfigDict(
    dict(
      variant='b7',
      # Directory written by `python -m dna_jax.convert_teacher`, or by the teacher stage.
      checkpoint='',
      # The authors ran the frozen teacher with BatchNorm in training mode (batch statistics).
      train_mode_bn=False,
      # Only for stages=teacher (demo): train the teacher on the data first.
      epochs=0.0,
      batch_size=256,
      learning_rate=0.002,
      weight_decay=1e-5,
      stem_stride=2,
      # 0: training examples // batch_size.
      steps_per_epoch=0,
    )
  )

  config.distill = ml_collections.ConfigDict(
    dict(
      epochs=20,
      # 0: one pass over the training split per epoch.
      steps_per_epoch=0,
      batch_size=512,
      # One learning rate per block (DNA's), multiplied by lr_decay every epoch.
      learning_rates='0.002,0.005,0.005,0.005,0.005,0.002',
      lr_decay=0.9,
      weight_decay=1e-4,
      # 'uniform' (DNA's: every layer's op drawn independently) or 'fair' (each op of a layer equally often).
      sampling='uniform',
      # '' trains every block, or e.g. '2,3'.
      blocks='',
      # 'pmap' or 'shard_map' (jit over a device mesh); the same per-device step runs under both.
      parallel='pmap',
      checkpoint_every_steps=500,
      keep_checkpoints=2,
      log_every_steps=50,
      profile_steps=0,
    )
  )

  config.rate = ml_collections.ConfigDict(
    dict(
      batch_size=256,
      # Paths evaluated together in one vmapped call (lower it if device memory runs out).
      chunk_size=216,
      calib_batch_size=64,
      blocks='',
    )
  )

  config.search = ml_collections.ConfigDict(dict(max_flops=0, max_params=0, top_k=5))

  config.retrain = ml_collections.ConfigDict(
    dict(
      # 'search' (the search stage's best), a named net (dna_a..dna_d, efficientnet_b0) or a JSON path.
      arch='search',
      epochs=350.0,
      batch_size=4096,
      optimizer='rmsprop',
      # Per 256 images; scaled linearly with the global batch.
      base_learning_rate=0.016,
      warmup_epochs=5.0,
      schedule='exponential',
      lr_decay=0.97,
      lr_decay_epochs=2.4,
      weight_decay=1e-5,
      label_smoothing=0.1,
      dropout_rate=0.2,
      drop_connect_rate=0.2,
      ema_decay=0.9998,
      # RMSProp as TensorFlow's (eps inside the square root); momentum also serves 'sgd'.
      rms_decay=0.9,
      rms_epsilon=1e-3,
      momentum=0.9,
      # 0: training examples // batch_size.
      steps_per_epoch=0,
      # Input normalization the child net is trained for (converted on device from data.normalization).
      normalization='imagenet',
      init_from_supernet=False,
      # 'pmap' or 'shard_map' (jit over a device mesh); the same per-device step runs under both.
      parallel='pmap',
      checkpoint_every_steps=1000,
      keep_checkpoints=2,
      log_every_steps=100,
      eval_every_epochs=1.0,
      # stages=evaluate: a child checkpoint directory (e.g. from dna_jax.convert_authors); '' evaluates
      # WORKDIR/retrain/final and best.
      checkpoint='',
    )
  )

  # stages=fidelity (see fidelity.py): num_archs nets trained standalone with the retrain recipe for `epochs`
  # (0: retrain.epochs); noise_archs of them again with noise_seed; `bootstrap` resamples per interval.
  config.fidelity = ml_collections.ConfigDict(
    dict(num_archs=12, noise_archs=2, noise_seed=1, epochs=0.0, bootstrap=2000)
  )
  return config


def get_retrain_config(arch: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Retraining a named net on ImageNet (TPU pod slice, batch 4096); `arg='local'`: a CPU smoke run."""
  config = get_base_config()
  config.stages = 'retrain,evaluate'
  config.retrain.arch = arch

  config.data.dataset = 'imagenet2012'
  config.data.image_size = 224
  config.data.normalization = 'imagenet'
  config.data.dtype = 'bfloat16'
  config.data.rating_examples = 0  # No search here: train on the whole train split.
  config.model.dtype = 'bfloat16'

  if arg == 'local':
    config.data.update(
      dict(
        dataset='fashion_mnist',
        image_size=32,
        dtype='float32',
        augment='simple',
        eval_split='test[:2000]',
        shuffle_buffer=4096,
      )
    )
    # Running BatchNorm statistics that settle within the few steps of a smoke run.
    config.model.update(dict(dtype='float32', bn_momentum=0.9))
    config.retrain.update(
      dict(
        batch_size=64,
        epochs=3,
        steps_per_epoch=100,
        warmup_epochs=0.5,
        lr_decay_epochs=1.0,
        checkpoint_every_steps=100,
        log_every_steps=20,
      )
    )
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; valid: local')
  return config


def parse_stages(text: str) -> list[str]:
  """Validated stage list in pipeline order."""
  names = [s.strip() for s in text.split(',') if s.strip()]
  if not names:
    raise ValueError(f'config.stages is empty; choose from {", ".join(STAGES)}')
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f'unknown stage(s) {", ".join(unknown)} in config.stages; valid: {", ".join(STAGES)}')
  return [s for s in STAGES if s in names]
