"""DNA search on ImageNet with the EfficientNet-B7 teacher and the paper's space (1.7e17 nets).

Prepare once: the B7 teacher (`python -m dna_jax.convert_teacher --variant b7 --keras_weights
efficientnetb7.h5 --out gs://BUCKET/teacher_b7`) and imagenet2012 in tfds (see README).
Run on a TPU VM / pod slice (every worker, see tpu_scripts/launch.sh):
  python -m dna_jax.main --config configs/imagenet_b7.py --workdir gs://BUCKET/dna \
      --config.teacher.checkpoint=gs://BUCKET/teacher_b7 --config.data.data_dir=gs://BUCKET/tfds
Stages distill (all 15 cells of 6 blocks in one run, 20 epochs) -> rate (all 23,010 paths on
10k held-out train images) -> search (DNA-a/b/c budgets) -> retrain the chosen net.
Expected cost: see the README's performance section (estimates from measured step times;
no full ImageNet run has been made with this code yet). The authors needed ~3 days on 8 GPUs
for distillation and 3-4 hours for rating + search.
Local smoke run (tiny sizes, still the real space and a B7 teacher, random teacher weights
are refused: bring a converted checkpoint): --config configs/imagenet_b7.py:local
"""

import ml_collections

from dna_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_base.get_base_config()
  config.stages = 'distill,rate,search'
  config.data.dataset = 'imagenet2012'
  config.data.image_size = 224
  config.data.normalization = 'raw'  # the Keras-converted teacher normalises inside
  config.data.color_jitter = 0.4
  config.data.rating_examples = 10000
  config.teacher.variant = 'b7'
  config.model.dtype = 'bfloat16'
  config.distill.epochs = 20
  config.distill.batch_size = 512
  config.rate.batch_size = 512
  config.rate.calib_batch_size = 512
  config.search.max_flops = 350_000_000  # DNA-a's budget; DNA-b used 399M, DNA-c 5.3M params
  config.search.top_k = 5
  if arg == 'local':
    config.model.dtype = 'float32'
    config.distill.epochs = 1
    config.distill.steps_per_epoch = 4
    config.distill.batch_size = 8
    config.data.rating_examples = 16
    config.rate.batch_size = 8
    config.rate.calib_batch_size = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; valid: local')
  return config
