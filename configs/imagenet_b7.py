"""DNA search on ImageNet with the EfficientNet-B7 teacher and the paper's space (2.9e16 nets, block 6 fixed).

Prepare once: the B7 teacher (`python -m dna_jax.convert_teacher --variant b7 --keras_weights
efficientnetb7.h5 --out gs://BUCKET/teacher_b7`) and imagenet2012 in tfds (see README).
Run on a TPU VM / pod slice (every worker, see tpu_scripts/launch.sh):
  python -m dna_jax.main --config configs/imagenet_b7.py --workdir gs://BUCKET/dna \
      --config.teacher.checkpoint=gs://BUCKET/teacher_b7 --config.data.data_dir=gs://BUCKET/tfds
Stages distill (all 15 cells of 6 blocks in one run, 20 epochs) -> rate (all 23,005 paths on 10k
held-out train images; block 6 is fixed to k3e6 as in the authors' search and every published net)
-> search (DNA-a's budget; DNA-b used 399M FLOPs, DNA-c 5.3M params). Rating is adaptive (rate.adaptive):
every path is rated on the first 1,024 images (2 batches); the paths that 5 cheaper ones clearly beat
stop there, the rest are rated on all 10,000; the search's top 5 and Pareto fronts are unchanged. Distillation augmentation is
the authors': inception crop with random bilinear/bicubic resize, flip, colour jitter 0.4, random
erasing p 0.5 with normal per-pixel noise.
Expected cost: see the README's performance section (estimates from measured step times; no full
ImageNet run has been made with this code yet). The authors needed ~3 days on 8 GPUs for
distillation and 3-4 hours for rating + search.

`:authors` follows the authors' released code wherever dna_jax's default differs (README, "Known
differences"): float32 instead of bfloat16; the teacher with batch-statistics BatchNorm during
distillation (teacher.train_mode_bn) and, for rating, recalibrated on the calibration batch then in
inference mode (teacher.rating_bn='recalibrated'); an augmented calibration batch
(data.calib_augment); 9,728 rating images (19 batches of 512), every path on every image
(rate.adaptive=False). The search objective stays the sum
of relative L1 scores, their default (`--config.search.objective=norm_sum` or `product` are their
other two).
Local smoke run (tiny sizes, still the real space and a B7 teacher; random teacher weights are
refused: bring a converted checkpoint): --config configs/imagenet_b7.py:local
"""

import ml_collections

from dna_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_base.get_base_config()
  config.stages = 'distill,rate,search'
  config.space.blocks = 'imagenet'  # block 6 pinned to k3e6; 'imagenet_free6' searches it too
  config.data.dataset = 'imagenet2012'
  config.data.image_size = 224
  config.data.normalization = 'raw'  # the Keras-converted teacher normalises inside
  config.model.normalization = 'imagenet'  # the student reads what the authors' student read
  config.data.color_jitter = 0.4
  config.data.random_erasing = 0.5
  config.data.random_erasing_mode = 'normal'
  config.data.train_resize_method = 'random'
  config.data.rating_examples = 10000
  config.teacher.variant = 'b7'
  config.model.dtype = 'bfloat16'
  config.distill.epochs = 20
  config.distill.batch_size = 512
  # TPU VM and GPU hosts have dozens of cores: initialising the supernet with 12 threads on an H200 host
  # took 37.3 s (README, accelerator rows).
  config.distill.compile_threads = 8
  config.rate.batch_size = 512
  config.rate.calib_batch_size = 512
  config.rate.adaptive_examples = 1024
  config.search.max_flops = 350_000_000  # DNA-a's budget
  config.search.top_k = 5
  if arg == 'authors':
    config.model.dtype = 'float32'
    config.teacher.train_mode_bn = True
    config.teacher.rating_bn = 'recalibrated'
    config.data.calib_augment = True
    config.data.rating_examples = 9728
    config.rate.adaptive = False
  elif arg == 'local':
    config.model.dtype = 'float32'
    config.distill.epochs = 1
    config.distill.steps_per_epoch = 4
    config.distill.batch_size = 8
    config.data.rating_examples = 16
    config.rate.batch_size = 8
    config.rate.calib_batch_size = 8
    config.rate.chunk_size = 6  # the fastest on a CPU (README, rating rows)
    config.distill.compile_threads = 2  # 2 cores
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; valid: authors, local')
  return config
