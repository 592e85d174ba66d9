"""Retrain DNA-b (EfficientNet-B0 FLOPs budget) on ImageNet with the EfficientNet recipe; evaluate it.

Run (Cloud TPU pod slice, e.g. v3-32 / v4-32; global batch 4096, 350 epochs):
  python -m dna_jax.main --config configs/dna_b.py --workdir gs://BUCKET/dna_b
Expected: 77.5% ImageNet top-1 (published).
(Users of the DNA authors' retraining script land 0.6-0.9 points under the DNA paper.)
Optional augmentation: --config.data.randaugment_layers=2 --config.data.random_erasing=0.25.
Measured with dna_jax: not yet run (no TPU time so far); results land in WORKDIR/retrain/results.json.
Recipe (config_base defaults): RMSProp (TF form) 0.016 x batch/256, 5 warm-up epochs, x0.97 every 2.4
epochs, L2 1e-5 on kernels, label smoothing 0.1, dropout 0.2, drop-connect 0.2, EMA 0.9998, bfloat16.
The authors' released retraining script instead (--config configs/dna_b.py:authors): 500 epochs,
batch 1024 (128 per device on 8), lr 0.064 (0.016 x batch/256), x0.963 every 3 epochs after 5 warm-up
epochs, weight decay 1e-4, EMA 0.9998 without warm-up, BatchNorm per device, PyTorch padding and BatchNorm
(eps 1e-5, momentum 0.1), colour jitter 0.06, random bilinear/bicubic train resize, float32.
Local smoke run (Fashion-MNIST at 32 px, 300 steps of 64, CPU): --config configs/dna_b.py:local
(prepare the data once: python -m dna_jax.prepare_data --dataset fashion_mnist). Measured for dna_a on
2 shared CPU cores: about 5 minutes, test top-1 16% (EMA): it checks the machinery; these deep nets
need far more than 300 steps.
"""

import ml_collections

from dna_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_base.get_retrain_config('dna_b', arg)
