"""Entry point: python -m dna_jax.main --config configs/NAME.py --workdir DIR [--config.key=value]."""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dna_jax import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, ratings, logs and results (may be gs://).')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:arg]).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


# Libraries whose INFO records (a dozen lines per checkpoint save) would bury our progress lines.
QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/etils/')


class QuietLibraries(std_logging.Filter):
  """Drops INFO and DEBUG records of QUIET_LIBRARIES unless DNA_JAX_VERBOSE is set."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(part in record.pathname for part in QUIET_LIBRARIES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not os.environ.get('DNA_JAX_VERBOSE'):
    logging.get_absl_handler().addFilter(QuietLibraries())
  # Cloud TPU pods (tpu_scripts/ set this): one process per host, joined before any device use.
  if os.environ.get('DNA_JAX_DISTRIBUTED'):
    jax.distributed.initialize()
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(), jax.process_count(), jax.local_devices())
  try:
    pipeline.run(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # User-facing problems (bad config, missing data or checkpoints, a diverged loss): the message
    # says what to do. DNA_JAX_TRACEBACK=1 shows where it came from.
    if os.environ.get('DNA_JAX_TRACEBACK'):
      raise
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
