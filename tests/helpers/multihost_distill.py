"""One process of the multi-host check: a few distillation steps, parameters saved to an .npz.

python tests/helpers/multihost_distill.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT [PROGRAMS]

PROGRAMS is distill.programs (default step); the parameters go to OUT_DIR/params_{NUM_PROCESSES}_{PROGRAMS}.npz.
"""

import os
import sys

NUM_PROCESSES, PROCESS_ID = int(sys.argv[2]), int(sys.argv[3])
PROGRAMS = sys.argv[5] if len(sys.argv) > 5 else 'step'
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={8 // NUM_PROCESSES}'
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_disable_most_optimizations', True)
if NUM_PROCESSES > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{sys.argv[4]}', num_processes=NUM_PROCESSES, process_id=PROCESS_ID
  )

import flax
import jax.numpy as jnp
import numpy as np

from dna_jax import config_base
from dna_jax import distill_steps
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax.models import efficientnet
from dna_jax.models import supernet
from dna_jax.stages import distill

IMAGE, STEPS, GLOBAL_BATCH = 16, 3, 16


def global_batches(start_step):
  """The same global batch stream for any process layout; each process takes its own rows."""
  local_devices = jax.local_device_count()
  per_device = GLOBAL_BATCH // jax.device_count()
  step = start_step
  while True:
    step += 1
    images = np.random.default_rng(step).uniform(0, 1, (GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    mine = images.reshape(jax.process_count(), local_devices, per_device, IMAGE, IMAGE, 3)[jax.process_index()]
    yield {'image': mine, 'label': np.zeros(mine.shape[:2], np.int32)}


def main():
  out_dir = sys.argv[1]
  config = config_base.get_base_config()
  config.space.blocks = '2 16 1@8,2@8; 2 24 1@12'
  config.space.stem_width, config.space.ds_width, config.space.stem_stride = 8, 8, 1
  config.data.image_size = IMAGE
  config.data.normalization = 'imagenet'  # the random images as the student reads them: no conversion
  config.distill.update(
    dict(
      epochs=1,
      batch_size=GLOBAL_BATCH,
      learning_rates='0.01',
      checkpoint_every_steps=STEPS,
      log_every_steps=1,
      programs=PROGRAMS,
    )
  )
  teacher = efficientnet.variant('tiny', num_classes=10)
  teacher_variables = jax.jit(lambda r: teacher.init(r, jnp.zeros((1, IMAGE, IMAGE, 3))))(jax.random.PRNGKey(7))
  space = space_lib.space_from_config(config.space)
  workdir = os.path.join(out_dir, f'workdir_{NUM_PROCESSES}_{PROGRAMS}')
  distill.train_blocks(config, workdir, teacher, teacher_variables, space, global_batches, STEPS)
  restored = {}
  cells = supernet.supernet_cells(space, stem_stride=1)
  for k in (1, 2):
    tx = supernet_store.block_optimizer(distill_steps.create_learning_rate_fn(0.01, 0.9, STEPS), 1e-4)
    size = space_lib.supernet_input_sizes(space, IMAGE, 1)[k - 1]
    fresh = supernet_store.create_block_state(jax.random.PRNGKey(0), tuple(cells[k - 1]), size, tx)
    manager = supernet_store.block_manager(workdir, k - 1)
    state, _ = supernet_store.restore_block(manager, fresh, k - 1)
    manager.close()
    restored[f'block{k}'] = jax.device_get(state.params)
  if jax.process_index() == 0:
    flat = flax.traverse_util.flatten_dict(restored, sep='/')
    np.savez(os.path.join(out_dir, f'params_{NUM_PROCESSES}_{PROGRAMS}.npz'), **flat)
  print('done', jax.process_index(), jax.device_count())


if __name__ == '__main__':
  main()
