"""Entry point: python -m dna_jax.main --config configs/NAME.py --workdir DIR [--config.key=value]."""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dna_jax import cli
from dna_jax import host_memory
from dna_jax import program_cache
from dna_jax import stages

FLAGS = flags.FlagValues()
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, ratings, logs and results (may be gs://).', flag_values=FLAGS
)
config_flags.DEFINE_config_file(
  'config', None, 'Config file (configs/NAME.py[:arg]).', flag_values=FLAGS, lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'], flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  # Cloud TPU pods (tpu_scripts/ set this): one process per host, joined before any device use.
  if os.environ.get('DNA_JAX_DISTRIBUTED'):
    jax.distributed.initialize()
  program_cache.enable_compilation_cache(FLAGS.config.compilation_cache_dir, FLAGS.config.compilation_cache_max_gb)
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(), jax.process_count(), jax.local_devices())
  logging.info(
    'Host malloc: %s (%s); %s=%r',
    host_memory.wanted_mode(),
    host_memory.ENV,
    host_memory.TUNABLES_ENV,
    os.environ.get(host_memory.TUNABLES_ENV, ''),
  )
  stages.run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  cli.run(main, FLAGS)
