"""One process of the multi-host rating check: rates prepared workdirs with one layout of devices.

  python tests/helpers/multihost_rate.py ROOT DATA_DIR NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES MODES

For each teacher.rating_bn mode in MODES (comma-separated), ROOT/MODE holds a teacher checkpoint
(teacher/) and distilled blocks (distill/); its ratings land in ROOT/MODE/ratings. `config()` is the
one config of the check, shared with the test that prepares the workdirs.
"""

import os
import sys

if __name__ == '__main__':
  NUM_PROCESSES, PROCESS_ID, LOCAL_DEVICES = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={LOCAL_DEVICES}'
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax

from dna_jax import config_base

IMAGE = 16
SPACE = '2 16 1@8,2@8; 2 24 1@12'


def config(data_dir: str, rating_bn: str = 'running'):
  """20 rating images in batches of 16 (the last one padded), a calibration batch of 8, adaptive rating."""
  config = config_base.get_base_config()
  config.space.blocks = SPACE
  config.space.update(dict(stem_width=8, ds_width=8, head_width=32, stem_stride=1))
  config.teacher.update(dict(variant='tiny', stem_stride=1, rating_bn=rating_bn))
  config.data.update(
    dict(
      dataset='imagenet2012',
      data_dir=data_dir,
      image_size=IMAGE,
      normalization='unit',
      rating_examples=20,
      calib_examples=8,
      shuffle_buffer=16,
      num_threads=1,
    )
  )
  # adaptive rating stops the dominated paths after the first batch: every host must stop the same ones
  config.rate.update(dict(batch_size=16, calib_batch_size=8, adaptive_examples=16))
  return config


def main():
  root, data_dir, port, modes = sys.argv[1], sys.argv[2], sys.argv[5], sys.argv[7].split(',')
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_disable_most_optimizations', True)
  if NUM_PROCESSES > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=NUM_PROCESSES, process_id=PROCESS_ID
    )
  from dna_jax.stages import rate

  for rating_bn in modes:  # one process start and one compile of the cells for every mode
    rate.run(config(data_dir, rating_bn), os.path.join(root, rating_bn))
  print('done', jax.process_index(), jax.device_count())


if __name__ == '__main__':
  main()
