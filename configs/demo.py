"""The whole DNA method in minutes on a laptop: Fashion-MNIST, a small space, a small teacher.

Run (every stage, resumable; rerunning skips finished stages):
  python -m dna_jax.main --config configs/demo.py --workdir /tmp/dna_demo

Stages: train a tiny EfficientNet teacher (no pretrained one exists for this data) ->
distil all 6 cells of 3 blocks -> rate all 336 paths -> exact search under a FLOPs
budget -> retrain the chosen net from scratch -> evaluate on the test split.
The space holds 42 x 252 x 42 = 444,528 architectures.
Expected (measured on 2 idle AMD EPYC (Zen 4) cores, fresh workdir, tfds directory and caches, 2026-12-05):
7 min 56 s in all, peak host memory 5.6 GiB: teacher 149 s to 86.94% test top-1; distill 163 s; rate
50 s; search under 1 s; retrain 101 s to 83.53% test top-1; evaluate 8 s. The chosen net is
16,8,128|8s2:k5e3/12s2:k5e3-k7e6/16s1:k5e6 (2.17 MFLOPs, 17,784 params); the run is deterministic (the
same net and accuracies on AMD Zen3, AMD EPYC and Intel Xeon machines). The last eight runs on that machine
kind took 7 min 56 s to 10 min 4 s, three on an Intel Xeon (AVX-512) 8 min 43 s to 9 min 41 s; every run
since the first (31 min 26 s on that Xeon), with its stage times and what changed, is in the README's
performance section.
`:local` is the same with fewer steps (a smoke run).
Fashion-MNIST comes from tfds; offline it is prepared from the Debian package
dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`).
"""

import ml_collections

from dna_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_base.get_base_config()
  config.stages = 'teacher,distill,rate,search,retrain,evaluate'

  config.data.dataset = 'fashion_mnist'
  config.data.auto_prepare = True
  config.data.image_size = 32
  config.data.normalization = 'unit'
  config.data.augment = 'simple'
  config.data.small_image_fit = 'pad'  # 28 -> 32 by zero padding
  config.data.crop_fraction = 1.0
  config.data.eval_split = 'test'
  config.data.rating_examples = 1000
  config.data.calib_examples = 512
  config.data.shuffle_buffer = 4096
  # No tf.data autotuning: on 2 CPU cores, shutting down its tuning thread stalled the end of half of
  # 12 fidelity trainings by 10-48 s; with fixed parallelism they end at once, at the same speed.
  config.data.autotune = False

  # Short runs: running BatchNorm statistics must catch up within a few hundred steps.
  config.model.bn_momentum = 0.9

  config.space.blocks = '2 16 1@8,2@8; 2 24 2@12,3@12; 1 32 1@16,2@16'
  config.space.stem_width, config.space.ds_width, config.space.head_width = 16, 8, 128
  config.space.stem_stride = 1

  config.teacher.variant = 'tiny'
  config.teacher.stem_stride = 1
  config.teacher.training.update(
    dict(
      epochs=1.5,
      batch_size=256,
      base_learning_rate=0.004,
      warmup_epochs=0.15,
      weight_decay=1e-5,
      checkpoint_every_steps=200,
      log_every_steps=50,
    )
  )

  config.distill.epochs = 4
  config.distill.steps_per_epoch = 50
  config.distill.batch_size = 128
  config.distill.learning_rates = '0.005,0.005,0.005'
  config.distill.checkpoint_every_steps = 50
  config.distill.log_every_steps = 20
  # One program for the whole step: on this small space it compiled 6% and stepped 1.23x faster than
  # one program per layer shape (benchmarks/distill_programs.py --space small --one_program, 2-core EPYC).
  # Since sampled-op programs: the distill stage alone 212.9 s with it against 246.2 s per layer shape
  # (fresh caches, 2-core EPYC; each op's programs compile when it is first sampled).
  config.distill.programs = 'step'

  # 250 images per rating call, not all 1,000 at once: the rate stage's peak host memory 14.0 -> 4.6 GiB
  # (`--config.stages=rate` on a demo workdir) and 80 -> 57 s in a fresh demo run, the same path order in
  # every block (scores within 4.4e-8) and the same chosen net (2-core AMD EPYC).
  config.rate.batch_size = 250
  config.rate.calib_batch_size = 256
  # 6 paths per vmapped call, not 216: on the demo workdir rating took 41 s instead of 53 exhaustively and
  # 21 s instead of 30 adaptively, the same answers (`benchmarks/adaptive_rating.py --chunk_size`, 2-core
  # Intel Xeon): on a CPU the smaller calls' activations stay in cache.
  config.rate.chunk_size = 6

  # A FLOPs budget at 32x32, 10 classes: the space spans about 1.6M to 2.9M.
  config.search.max_flops = 2_200_000
  config.search.top_k = 5

  config.retrain.arch = 'search'
  config.retrain.epochs = 1.5
  config.retrain.batch_size = 256
  config.retrain.optimizer = 'adam'
  config.retrain.base_learning_rate = 0.004
  config.retrain.warmup_epochs = 0.3
  config.retrain.schedule = 'cosine'
  config.retrain.weight_decay = 1e-5
  config.retrain.dropout_rate = 0.1
  config.retrain.drop_connect_rate = 0.1
  config.retrain.ema_decay = 0.999
  # One eval, at the end (as the teacher): an eval at epoch 1 took about 20 s of the demo on 2 idle AMD
  # EPYC cores (10,000 test images with EMA and with raw weights) and changed none of its results (the
  # retrain stage rerun without it: the same 83.53% test top-1).
  config.retrain.eval_every_epochs = 0.0
  config.retrain.checkpoint_every_steps = 200
  config.retrain.log_every_steps = 50

  config.fidelity.num_archs = 10
  config.fidelity.epochs = 1

  if arg == 'local':
    config.teacher.training.update(dict(epochs=1, warmup_epochs=0.1))
    config.distill.epochs = 2
    config.data.rating_examples = 500
    config.retrain.epochs = 1
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; valid: local')
  return config
