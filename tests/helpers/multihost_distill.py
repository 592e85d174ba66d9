"""One process of the multi-host check: a few distillation steps, parameters saved to an .npz.

python tests/helpers/multihost_distill.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT
"""

import os
import sys

NUM_PROCESSES, PROCESS_ID = int(sys.argv[2]), int(sys.argv[3])
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={8 // NUM_PROCESSES}'
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_disable_most_optimizations', True)
if NUM_PROCESSES > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{sys.argv[4]}', num_processes=NUM_PROCESSES, process_id=PROCESS_ID
  )

import flax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dna_jax import config_base  # noqa: E402
from dna_jax import distill  # noqa: E402
from dna_jax import space as space_lib  # noqa: E402
from dna_jax.models import efficientnet  # noqa: E402

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
  config.distill.update(
    dict(epochs=1, batch_size=GLOBAL_BATCH, learning_rates='0.01', checkpoint_every_steps=STEPS, log_every_steps=1)
  )
  teacher = efficientnet.variant('tiny', num_classes=10)
  teacher_variables = jax.jit(lambda r: teacher.init(r, jnp.zeros((1, IMAGE, IMAGE, 3))))(jax.random.PRNGKey(7))
  space = space_lib.space_from_config(config.space)
  workdir = os.path.join(out_dir, f'workdir_{NUM_PROCESSES}')
  distill.train_blocks(config, workdir, teacher, teacher_variables, space, global_batches, STEPS)
  restored = {}
  for k in (1, 2):
    from dna_jax.models import supernet

    cells = supernet.supernet_cells(space, stem_stride=1)
    tx = distill.create_optimizer(distill.create_learning_rate_fn(0.01, 0.9, STEPS), 1e-4)
    size = distill.block_input_sizes(IMAGE, 1, space)[k - 1]
    fresh = distill.create_block_state(jax.random.PRNGKey(0), tuple(cells[k - 1]), size, tx)
    manager = distill.checkpoint_manager(distill.epath.Path(workdir) / 'distill' / f'block_{k}', config.distill)
    state, _ = distill.restore_latest(manager, fresh, f'block{k}')
    manager.close()
    restored[f'block{k}'] = jax.device_get(state.params)
  if jax.process_index() == 0:
    flat = flax.traverse_util.flatten_dict(restored, sep='/')
    np.savez(os.path.join(out_dir, f'params_{NUM_PROCESSES}.npz'), **flat)
  print('done', jax.process_index(), jax.device_count())


if __name__ == '__main__':
  main()
