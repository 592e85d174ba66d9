"""Two processes x 4 devices (jax.distributed on 127.0.0.1, gloo) distil and rate like one process."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import teacher as teacher_lib
from dna_jax.models import efficientnet
from dna_jax.stages import distill

from helpers import multihost_rate
from helpers import tiny_imagenet

WORKER = os.path.join(os.path.dirname(__file__), 'helpers', 'multihost_distill.py')
RATE_WORKER = os.path.join(os.path.dirname(__file__), 'helpers', 'multihost_rate.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(out_dir, num_processes, programs='step'):
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, str(out_dir), str(num_processes), str(i), port, programs],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_two_processes_match_one_process(tmp_path):
  """And with one program per layer shape (distill.programs='layer') across 2 processes as well."""
  one = run_processes(tmp_path, 1)
  two = run_processes(tmp_path, 2)
  two_layerwise = run_processes(tmp_path, 2, 'layer')
  assert 'done 0 8' in one[0] and 'done 1 8' in two[1] and 'done 1 8' in two_layerwise[1]
  a = np.load(tmp_path / 'params_1_step.npz')
  for other in ('params_2_step.npz', 'params_2_layer.npz'):
    b = np.load(tmp_path / other)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 50
    # Cross-process reductions sum in another order: float32 rounding only, which Adam can blow up to
    # ~1e-5 on parameters whose gradient is ~0 (a BN bias feeding another BN). A wrong global batch or
    # gradient average moves parameters by ~lr = 1e-2 in 3 Adam steps.
    for key in a.files:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=f'{other}: {key}')


@pytest.fixture(scope='module')
def distilled(tmp_path_factory):
  """(data_dir, workdir): a tiny imagenet2012 and a workdir with a random tiny teacher and 2 distilled steps."""
  root = tmp_path_factory.mktemp('multihost_rate')
  data_dir = tiny_imagenet.make(str(root), per_class=12, validation=3)
  config = multihost_rate.config(data_dir)
  config.distill.update(dict(epochs=1, batch_size=16, learning_rates='0.01', checkpoint_every_steps=2))
  model = efficientnet.variant('tiny', num_classes=3)
  size = multihost_rate.IMAGE
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3))))(jax.random.PRNGKey(7))
  # Non-trivial running statistics: recalibration and inference mode then give different teachers.
  variables['batch_stats'] = jax.tree.map(lambda x: x + 0.3, variables['batch_stats'])
  workdir = root / 'source'
  teacher_lib.save(str(workdir / 'teacher'), model, variables, {'variant': 'tiny'})

  def batches(start_step):
    step = start_step
    while True:
      step += 1
      images = np.random.default_rng(step).uniform(0, 1, (8, 2, size, size, 3)).astype(np.float32)
      yield {'image': images, 'label': np.zeros((8, 2), np.int32)}

  space = space_lib.space_from_config(config.space)
  distill.train_blocks(config, str(workdir), model, variables, space, batches, 2)
  return data_dir, workdir


RATING_MODES = ('running', 'recalibrated')


def rate_with(distilled, root, num_processes, local_devices):
  """Rates copies of the distilled workdir with one device layout, once per teacher.rating_bn mode.

  Returns {mode: {block: (scores, mse)}} in file order.
  """
  data_dir, source = distilled
  for mode in RATING_MODES:
    shutil.copytree(source, root / mode)
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  args = [str(root), data_dir, str(num_processes)]
  procs = [
    subprocess.Popen(
      [sys.executable, RATE_WORKER, *args, str(i), port, str(local_devices), ','.join(RATING_MODES)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  for p in procs:
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-3000:]
  results = {}
  for mode in RATING_MODES:
    table = ratings_lib.read_ratings(str(root / mode / 'ratings'))
    results[mode] = {k: (block.score, block.mse, block.images) for k, block in enumerate(table.blocks)}
  return results


def test_rating_is_the_same_on_any_number_of_hosts(distilled, tmp_path):
  """2 processes x 4 devices rate to the same ratings/block_K.csv as 1 x 8 and 1 x 1 (20 images, the last
  batch padded), with the teacher in inference mode and recalibrated as the authors did, and adaptive
  rating stops the same paths after the first batch."""
  one = rate_with(distilled, tmp_path / 'one', 1, 1)
  eight = rate_with(distilled, tmp_path / 'eight', 1, 8)
  pod = rate_with(distilled, tmp_path / 'pod', 2, 4)
  for mode in RATING_MODES:
    for k, (score, mse, images) in one[mode].items():
      assert len(set(np.round(score, 5))) > len(score) // 2  # paths really differ
      assert set(images) <= {16, 20}
      for other in (eight, pod):
        np.testing.assert_array_equal(other[mode][k][2], images, err_msg=f'{mode} block {k + 1}: other paths stopped')
        # float32 sums in another order only; a miscounted host would be off by up to 2x
        np.testing.assert_allclose(other[mode][k][0], score, rtol=2e-5, err_msg=f'{mode} block {k + 1} scores')
        np.testing.assert_allclose(other[mode][k][1], mse, rtol=2e-5, err_msg=f'{mode} block {k + 1} mse')
  assert any(16 in one[mode][k][2] for mode in RATING_MODES for k in one[mode])  # adaptive rating stopped some
  # the modes themselves differ: the recalibrated teacher is another teacher
  assert not np.allclose(one['running'][1][0], one['recalibrated'][1][0])
