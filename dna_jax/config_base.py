"""The full default configuration that every config file starts from: every default lives here.

Config files under configs/ call `get_base_config()` and override a few fields (the flax examples'
`configs/default.py` pattern, kept inside the package so that a config file loads from any working
directory). Sections: data, model, space, teacher (with the demo teacher's `training` recipe),
distill, rate, search, retrain (a trainer section, see trainer.py), fidelity.
"""

from __future__ import annotations

import json

from etils import epath
import ml_collections

# Where Debian's dataset-fashion-mnist package puts the Fashion-MNIST files.
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'


def get_data_config() -> ml_collections.ConfigDict:
  """Data settings (input_pipeline.py): ImageNet at 224 px, raw 0..255 pixels."""
  config = ml_collections.ConfigDict()
  config.dataset = 'imagenet2012'  # Any tfds image-classification dataset.
  config.data_dir = ''  # tfds data_dir (may be gs://); '': TFDS_DATA_DIR or tfds's own.
  config.local_files_dir = FASHION_MNIST_DEBIAN_DIR
  # Prepare a missing small dataset on first use (never imagenet2012: it needs the manual tars).
  config.auto_prepare = False
  config.train_split = 'train'  # A plain split name: rate/calib carve it.
  config.eval_split = 'validation'
  config.rating_examples = 10000  # Held-out train prefix used by 'rate'.
  config.calib_examples = 2048  # Training images in the 'calib' stream.
  config.calib_augment = False
  config.image_size = 224
  config.normalization = 'raw'  # 'raw' (0..255), 'imagenet' or 'unit'.
  config.dtype = 'float32'  # 'bfloat16' on TPU.
  config.augment = 'inception'  # 'inception', 'simple' (pad+crop) or 'none'.
  config.simple_pad = 4  # Pixels padded before the 'simple' random crop.
  config.small_image_fit = 'resize'  # Or 'pad': zero-pad smaller images.
  config.color_jitter = 0.0  # Brightness/contrast/saturation strength.
  config.randaugment_layers = 0  # 0: RandAugment off.
  config.randaugment_magnitude = 10  # 0..10.
  config.random_erasing = 0.0  # Probability per image.
  config.random_erasing_mode = 'uniform'  # Noise 0..255, or 'normal' (timm's 'pixel', the authors').
  config.resize_method = 'bicubic'
  config.train_resize_method = ''  # '': resize_method; 'random': bilinear or bicubic (timm's, the authors').
  config.crop_fraction = 0.875  # Eval center crop, of the shorter side.
  config.shuffle_buffer = 16384
  config.seed = 0
  config.deterministic = True
  config.cache = False  # Cache the encoded examples in memory.
  config.num_threads = 0  # tf.data threads; 0: one per core.
  config.prefetch = 2  # Batches prefetched by tf.data.
  # tf.data autotuning of parallelism and buffers. Off: tf.data's fixed default parallelism and no
  # tuning thread, whose shutdown stalled the end of short CPU trainings by up to a minute.
  config.autotune = True
  return config


def trainer_config(**overrides) -> ml_collections.ConfigDict:
  """A trainer section (trainer.py): EfficientNet's ImageNet recipe unless overridden."""
  config = ml_collections.ConfigDict(
    dict(
      epochs=350.0,
      batch_size=4096,
      # 0: training examples // batch_size.
      steps_per_epoch=0,
      optimizer='rmsprop',
      # Per 256 images; scaled linearly with the global batch.
      base_learning_rate=0.016,
      warmup_epochs=5.0,
      schedule='exponential',
      lr_decay=0.97,
      lr_decay_epochs=2.4,
      weight_decay=1e-5,
      label_smoothing=0.1,
      ema_decay=0.9998,
      # TensorFlow's num_updates warm-up of the EMA decay (False: timm's constant decay).
      ema_warmup=True,
      # RMSProp as TensorFlow's (eps inside the square root); momentum also serves 'sgd'.
      rms_decay=0.9,
      rms_epsilon=1e-3,
      momentum=0.9,
      # 'pmap' or 'shard_map' (jit over a device mesh); the same per-device step runs under both.
      parallel='pmap',
      checkpoint_every_steps=1000,
      keep_checkpoints=2,
      log_every_steps=100,
      # 0: evaluate once, at the end.
      eval_every_epochs=1.0,
    )
  )
  config.update(overrides)
  return config


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Comma-separated, run in pipeline order (stages/__init__.py); finished stages are skipped on rerun.
  config.stages = 'distill,rate,search'
  # JAX's persistent compilation cache: a rerun, a resumed run or the next stage loads compiled programs
  # instead of compiling again. 'auto': $XDG_CACHE_HOME/dna_jax/jax (~/.cache/...); '': off; or a path.
  config.compilation_cache_dir = 'auto'
  # Compiled executables stored by what built them (program_cache.py): a rerun, a resumed run or the next
  # stage loads the distillation step without tracing it again. 'auto': $XDG_CACHE_HOME/dna_jax/programs;
  # '': off; or a path. The files hold native code: the directory must be trusted like the code.
  config.program_cache_dir = 'auto'
  # Sizes above which each cache deletes its least recently used programs (0: never). The demo's
  # distillation step takes 46 MB of stored executables and 10 MB of JAX's cache; each change to
  # this package's source stores it anew.
  config.compilation_cache_max_gb = 2.0
  config.program_cache_max_gb = 2.0

  config.data = get_data_config()

  # Numerical conventions of the student/child nets (see models.layers.Conventions), and the input
  # normalization they read (the supernet's block 1 and the child alike; converted on device from
  # data.normalization, which is what the teacher reads). 'device' BatchNorm keeps statistics per device.
  config.model = ml_collections.ConfigDict(
    dict(
      padding='tf_same',
      bn_epsilon=1e-3,
      bn_momentum=0.99,
      depthwise='auto',
      dtype='float32',
      normalization='imagenet',
      bn_sync='global',
    )
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
      # Distillation: the authors ran the frozen teacher with BatchNorm in training mode (batch statistics).
      train_mode_bn=False,
      # Rating: 'running' (inference mode), 'batch' (statistics of each rating batch) or 'recalibrated'
      # (the authors': statistics recomputed on the calibration batch, then inference mode).
      rating_bn='running',
      # Only for stages=teacher (the demo): the teacher's stem stride and its training recipe.
      stem_stride=2,
      training=trainer_config(
        epochs=0.0,
        batch_size=256,
        optimizer='adam',
        base_learning_rate=0.002,
        warmup_epochs=0.0,
        schedule='cosine',
        ema_decay=0.999,
        eval_every_epochs=0.0,
      ),
    )
  )

  config.distill = ml_collections.ConfigDict(
    dict(
      epochs=20,
      # 0: one pass over the training split per epoch.
      steps_per_epoch=0,
      batch_size=512,
      # One learning rate per block (DNA's), multiplied by lr_decay every epoch; lr_decay_offset 1 is the
      # authors' StepLR, which steps once before the first epoch (epoch 1 runs at lr x 0.9).
      learning_rates='0.002,0.005,0.005,0.005,0.005,0.002',
      lr_decay=0.9,
      lr_decay_offset=1,
      weight_decay=1e-4,
      # 'uniform' (DNA's: every layer's op drawn independently) or 'fair' (each op of a layer equally often).
      sampling='uniform',
      # '' trains every block, or e.g. '2,3'.
      blocks='',
      # 'pmap' or 'shard_map' (jit over a device mesh); the same per-device step runs under both.
      parallel='pmap',
      # What the backward pass recomputes (models/supernet.py REMAT): 'op' (every candidate op
      # rematerialised; fastest measured), 'dots' (1x1 conv outputs kept) or 'none'. With
      # programs='layer' each link's backward program recomputes its sampled op whatever this says
      # (or, with sampled_op_programs on one device, keeps all of its residuals).
      remat='op',
      # 'layer': one program per layer shape, shared by every layer and cell of that shape; 'step': the
      # whole step one program (distill_steps.py). Same update. Measured on a 2-core AMD EPYC
      # (benchmarks/distill_programs.py): the 15-cell ImageNet step (B7 teacher, batch 8) compiles as 61
      # programs in 246 s within 6.4 GiB of host memory (as one program it was not compiled there; it
      # took 310 s on a Zen3 and 908 s on a Xeon, where its student part alone passed 18 GiB); on block 3
      # alone, same run, 'layer' compiled 1.38x and stepped 1.31x faster. On the demo's small space one
      # program compiled 6% and stepped 1.23x faster, so configs/demo.py uses 'step'. Since then (each
      # link's optimizer update its own program; compile_threads below), on 2 idle Xeon cores: the
      # 15-cell step's first step 88-92 s, 2.9 s per step; on the demo space 'layer' compiled 1.34x
      # faster and stepped 1.05x slower than 'step' (same run).
      programs='layer',
      # With programs='layer' on one device of one process (a CPU host; ignored elsewhere): how many
      # cells run at once, from as many threads. The 15-cell ImageNet step on 2 CPU cores: 1.06x with 2
      # (benchmarks/distill_programs.py --concurrent_cells 2, same run, 7.85 vs 8.35 s; bit-identical);
      # on 2 AMD EPYC cores 1.00x, and 0.85-0.97x on another (README): within the noise there; kept, bit-identical.
      concurrent_cells=2,
      # With programs='layer' on one device (in all): each link's sampled op (read back to the host once
      # the paths are drawn) runs as a forward of its own that keeps the residuals of its gradient, and a
      # backward from them, instead of a switch over the ops whose backward recomputes the sampled one.
      # The 15-cell ImageNet step (B7 teacher, batch 8, 2 cells at once) on 2 idle AMD EPYC cores, same run
      # (benchmarks/distill_programs.py --recompute_baseline): 2.71 against 3.14 s per step (1.16x; 1.05x
      # on a freshly set-up one later that day, compile 174-182 against 111 s), the
      # student part then 1.14-1.22x faster than a PyTorch stand-in for the authors'; but 302 programs
      # instead of 82 (a forward and a backward per op of each layer shape), so the first step traces and
      # compiles in 194-223 s instead of 118-123 s, and on XLA:CPU the process reaches 46,000-50,000 of
      # Linux's default 65,530 memory mappings (with too few left it falls back to the switch, warning).
      sampled_op_programs=True,
      # With programs='layer' under shard_map in one process: before the first step, every program is
      # traced from the arguments' shapes while this many threads compile them (0: each compiles when
      # first called). The 15-cell ImageNet step's first step on 2 idle Xeon cores (one cold run each,
      # benchmarks/distill_programs.py --compile_threads N): 104.4 s with 0, 96.2 s with 1, 88.3 s with 2
      # (92.2 and 92.3 s in two more runs with 2, against 103.6 s with 0). On a fresh run (any programs
      # setting), as many threads first compile the supernet's link initialisers (one program per link
      # shape, `supernet.compile_link_inits`; fewer than 2: each compiles on first use): initialising the
      # ImageNet space (24 such programs) took 101.8 -> 82.9 s on 2 AMD EPYC cores; on an H200 host, with
      # 12 threads and the optimizer state made by one program per block, 198.5 -> 37.3 s (README). Hosts
      # with many cores (TPU VMs, GPU hosts) can take more threads.
      compile_threads=2,
      # Trace and compile the step in a second thread (running it once on all-zero states) while the
      # supernets are initialised, on a fresh run of one process. The demo's distill stage (20 steps,
      # empty caches, 2 idle Xeon cores, one run each): 147.5 -> 131.1 s; each slowed the other down
      # (initialising 37 -> 53 s, compiling 88 -> 107 s), so it saves 16 s of the 37 s a full overlap would.
      # While it compiles, the all-zero states take as much memory again as the blocks' states (0.8 GiB
      # for the default ImageNet space's 6 blocks with their Adam moments).
      compile_while_initialising=True,
      checkpoint_every_steps=500,
      keep_checkpoints=2,
      log_every_steps=50,
      profile_steps=0,
    )
  )

  config.rate = ml_collections.ConfigDict(
    dict(
      batch_size=256,
      # Paths evaluated together in one vmapped call (lower it if device memory runs out). For
      # accelerators: on one H200, bfloat16, 256 + 256 calibration images, the 1296-path 4@192 cell took
      # 0.26 s per batch at 216 (0.8 us per path per image; other sizes not measured there). On 2 CPU
      # cores 6 was fastest (README, rating rows): the CPU configs set it.
      chunk_size=216,
      calib_batch_size=64,
      blocks='',
      # Adaptive rating (path_pruning.py): every path is rated on the first `adaptive_examples` images
      # (whole batches); the paths that `keep` others beat clearly (paired differences over `groups`
      # groups of those images, mean - `clear_z` standard errors > 0) at no higher FLOPs and params are
      # in none of the search's top `keep` nets: their rating stops there (the CSV's `images` column).
      # keep must be at least search.top_k. adaptive=False rates every path on every image.
      adaptive=True,
      adaptive_examples=1000,
      groups=16,
      keep=5,
      clear_z=3.0,
    )
  )

  # objective: how block scores combine, 'sum', 'norm_sum' or 'product' (ratings.with_objective);
  # max_latency_ms needs latency_table, a directory written by `python -m dna_jax.latency`. 0: no budget.
  config.search = ml_collections.ConfigDict(
    dict(max_flops=0, max_params=0, top_k=5, objective='sum', max_latency_ms=0.0, latency_table='')
  )

  config.retrain = trainer_config(
    # 'search' (the search stage's best), a named net (dna_a..dna_d, efficientnet_b0) or a JSON path.
    arch='search',
    dropout_rate=0.2,
    drop_connect_rate=0.2,
    init_from_supernet=False,
    # stages=evaluate: a child checkpoint directory (e.g. from dna_jax.convert_authors); '' evaluates
    # WORKDIR/retrain/final and best.
    checkpoint='',
  )

  # stages=export: 'tflite' and/or 'saved_model' of export.checkpoint ('': WORKDIR/retrain/final).
  config.export = ml_collections.ConfigDict(dict(formats='tflite', checkpoint=''))

  # stages=fidelity (stages/fidelity.py): num_archs nets trained standalone with the retrain recipe for
  # `epochs` (0: retrain.epochs); noise_archs of them again with noise_seed; the picks are stratified
  # over the summed scores of `sample_size` random nets; `bootstrap` resamples per `level` interval.
  config.fidelity = ml_collections.ConfigDict(
    dict(
      num_archs=12,
      noise_archs=2,
      noise_seed=1,
      epochs=0.0,
      bootstrap=2000,
      sample_size=20_000,
      level=0.95,
      weights='ema',
    )
  )
  # stages=versus_random (stages/versus_random.py): the search's top_k nets and num_random nets of the space
  # within `tolerance` of the chosen net's FLOPs (uniform draws, `draws` per batch), each trained with
  # `seeds` seeds (config.seed, +1, ...) for `epochs` (0: retrain.epochs); `bootstrap` resamples per interval.
  # Both studies score a run by the test top-1 of its `weights`: 'ema' (as the retrain stage reports) or 'raw'.
  config.versus_random = ml_collections.ConfigDict(
    dict(
      num_random=10,
      seeds=3,
      tolerance=0.03,
      top_k=3,
      epochs=0.0,
      bootstrap=2000,
      level=0.95,
      draws=200_000,
      weights='ema',
      # True: the random nets are made of the chosen net's cells (same depth and widths per block, other
      # ops), so the study tells the ratings' choice of ops apart from a preference for shallow cells.
      same_cells=False,
    )
  )
  return config


# What `:authors` changes in a retraining config: the DNA authors' released script (retraining/run_example.sh
# on an early timm) instead of the EfficientNet TPU recipe.
AUTHORS_RETRAIN = dict(
  epochs=500.0,
  batch_size=1024,  # 128 per GPU x 8; their lr 0.064 is base_learning_rate 0.016 per 256
  base_learning_rate=0.016,
  warmup_epochs=5.0,
  schedule='exponential',
  lr_decay=0.963,
  lr_decay_epochs=3.0,
  weight_decay=1e-4,
  ema_decay=0.9998,
  ema_warmup=False,  # timm's ModelEma
)
AUTHORS_MODEL = dict(padding='symmetric', bn_epsilon=1e-5, bn_momentum=0.9, bn_sync='device', dtype='float32')
AUTHORS_DATA = dict(color_jitter=0.06, train_resize_method='random', resize_method='bicubic', dtype='float32')


def get_retrain_config(arch: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Retraining a named net on ImageNet (TPU pod slice, batch 4096).

  `arg`: 'local' (a CPU smoke run on Fashion-MNIST) or 'authors' (the authors' released retraining
  script: AUTHORS_RETRAIN, AUTHORS_MODEL, AUTHORS_DATA).
  """
  config = get_base_config()
  config.stages = 'retrain,evaluate'
  config.retrain.arch = arch

  config.data.dataset = 'imagenet2012'
  config.data.image_size = 224
  config.data.normalization = 'imagenet'
  config.data.dtype = 'bfloat16'
  config.data.rating_examples = 0  # No search here: train on the whole train split.
  config.model.dtype = 'bfloat16'

  if arg == 'authors':
    config.retrain.update(AUTHORS_RETRAIN)
    config.model.update(AUTHORS_MODEL)
    config.data.update(AUTHORS_DATA)
  elif arg == 'local':
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
    raise ValueError(f'unknown config argument {arg!r}; valid: authors, local')
  return config


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a pipeline run saved in WORKDIR/config.json, over the base config (for standalone commands)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist (no pipeline run in this workdir): pass --config')
  config = get_base_config()
  config.update(json.loads(path.read_text())['config'])
  return config
