"""Ranking fidelity on ImageNet: the paper's space rated with the B7 teacher (configs/imagenet_b7.py).

Run after configs/imagenet_b7.py in the same workdir (it holds WORKDIR/ratings and WORKDIR/search),
on a TPU VM / pod slice (every worker, see tpu_scripts/launch.sh), with the same identity flags:
  python -m dna_jax.main --config configs/imagenet_fidelity.py --workdir gs://BUCKET/dna \
      --config.teacher.checkpoint=gs://BUCKET/teacher_b7 --config.data.data_dir=gs://BUCKET/tfds
It picks 12 nets spread over the range of summed block scores (the search's choice and the
lowest-scoring net of the space included), trains each from scratch, 2 of them again with a
second seed, and reports Kendall tau / Spearman rho against ImageNet top-1 with 95% intervals,
beside FLOPs and params (the authors' ranking set reached tau ~0.65).
Schedule: training each net with the full 350-epoch recipe would cost 14 x 350 = 4,900 epochs,
14 full retrainings. Instead each net gets a standard short schedule: 40 epochs, cosine decay,
2 warm-up epochs, everything else the retrain recipe. 14 x 40 = 560 ImageNet epochs of nets of
~300-400 MFLOPs at 224 px, about 1.6 times one full 350-epoch retraining. Short schedules rank
nets well but not perfectly; the two-seed runs show the noise floor of the measurement.
Expected cost: not measured yet on TPU (no full ImageNet run has been made with this code);
estimate it as 560 x (one epoch of the retrain stage on your slice).
Measured: ...
"""

import os

import ml_collections

from dna_jax import cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f'unknown config argument {arg!r}; this config takes none')
  config = cli.load_config(os.path.join(os.path.dirname(__file__), 'imagenet_b7.py'), None)
  config.stages = 'fidelity'
  config.fidelity.num_archs = 12
  config.fidelity.noise_archs = 2
  config.fidelity.epochs = 40
  config.retrain.schedule = 'cosine'
  config.retrain.warmup_epochs = 2.0
  return config
