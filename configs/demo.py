"""The whole DNA method in minutes on a laptop: Fashion-MNIST, a small space, a small teacher.

Run (every stage, resumable; rerunning skips finished stages):
  python -m dna_jax.main --config configs/demo.py --workdir /tmp/dna_demo

Stages: train a tiny EfficientNet teacher (no pretrained one exists for this data) ->
distil all 6 cells of 3 blocks -> rate all 336 paths -> exact search under a FLOPs
budget -> retrain the chosen net from scratch -> evaluate on the test split.
The space holds 42 x 252 x 42 = 444,528 architectures.
Expected (measured on 2 idle AMD EPYC cores, fresh workdir, tfds directory and compilation cache:
12 min 2 s in all, peak host memory 9.1 GiB): teacher 236 s to 86.9% test top-1; distill 231 s
(33 s of it initialising the supernet, 83 s the first step's tracing and compilation); rate 57 s;
search under 1 s; retrain 188 s to 83.5% test top-1 (with an eval at epoch 1 as well, about 20 s,
since dropped); evaluate 6 s. The chosen net is
16,8,128|8s2:k5e3/12s2:k5e3-k7e6/16s1:k5e6 (2.17 MFLOPs, 17,784 params); the run is deterministic.
Rerun since with depthwise kernel gradients summed a few examples at a time (training steps 1.25x and
1.51x faster in benchmarks/train_step.py) on a slow day of the same machine kind: 19 min 10 s (every
stage 1.46-1.67x slower than above, the gradient-free rate stage too), the same net and accuracies.
On 2 idle Intel Xeon cores (AVX-512, the machine kind where it once took 31 min 26 s): 17 min 56 s, peak
8.9 GiB; teacher 366 s, distill 357 s, rate 87 s, retrain 244 s, evaluate 14 s; the same net and accuracies.
On a faster day of that machine kind, with the distill step compiled while the supernets initialise:
12 min 11 s, peak 8.8 GiB; teacher 251 s, distill 228 s, rate 56 s, retrain 183 s, evaluate 8 s; the same.
On a fast day of that machine kind, with every depthwise kernel gradient's taps summed in one reduction
and 1x1 convolutions as one 2-D matmul (layers.tap_sums, layers.channels_matmul): 9 min 9 s, peak 8.2
GiB; teacher 190 s, distill 169 s, rate 49 s, retrain 129 s, evaluate 8 s; the same net, top 5 and
accuracies (the ratings moved by float rounding: scores by up to 0.006). A second run: 8 min 43 s.
With the current code (rating 6 paths per call, sparse survivors, supernet initialisers compiled by 2
threads) on 2 idle AMD EPYC cores: 12 min 7 s, peak 5.4 GiB; teacher 220 s, distill 231 s, rate 76 s,
retrain 181 s, evaluate 11 s; the same net and accuracies (on an Intel Xeon the day before: 9 min 41 s).
With freed host memory kept for reuse on the CPU (dna_jax/host_memory.py, the default there since) on the
same machine kind later the same day: 9 min 58 s, peak 5.7 GiB; teacher 196 s, distill 201 s, rate 54 s, retrain
137 s, evaluate 6 s; the same net and accuracies (the 10-minute target met, with no margin); rerun
later: 9 min 56 s, peak 5.6 GiB (teacher 200 s, distill 194 s, rate 58 s, retrain 134 s, evaluate 5 s). The
next day: 10 min 18 s, peak 5.8 GiB (teacher 209 s, distill 200 s, rate 58 s, retrain 141 s, evaluate 6 s).
With malloc asking for transparent huge pages (host_memory.restart_with_huge_pages, which the command
runs at start) on 2 idle AMD EPYC (Zen 4) cores the same day, a few hours later: 9 min 49 s and 10 min 4 s
(teacher 185 / 196 s, distill 198 / 214 s, rate 63 / 61 s, retrain 128 / 119 s, evaluate 7 / 6 s; 5.5-5.7
GiB), against 11 min 21 s without them between the two runs; the same net and accuracies. Three hours
later, a faster hour, with initialisers compiled at LLVM optimisation level 1 (dna_jax/run_once.py):
9 min 6 s and 9 min 20 s (teacher 173 / 181 s, distill 189 / 189 s, rate 57 / 64 s, retrain 115 / 113 s,
evaluate 6 / 7 s; 5.8 GiB), and 9 min 11 s with the code before between them; the same net and accuracies.
That afternoon, with the one-program step's own switch gradient (supernet.recomputing_switch, the same
numbers bit for bit): 8 min 59 s and 8 min 44 s (teacher 160 / 161 s, distill 177 / 174 s, rate 71 / 64 s,
retrain 119 / 114 s, evaluate 6 / 6 s; 5.6-5.7 GiB; in the first run rating called the ops jitted, since
reverted); the same net and accuracies.
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
