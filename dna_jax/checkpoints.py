"""Checkpoints of every stage: Orbax managers for training, and variable directories for finished nets.

Training checkpoints (distillation blocks, retraining, the demo teacher's training, study runs):
an Orbax `CheckpointManager` per directory holding `Composite(state=..., meta=JSON)`, made by
`manager` (the async policy lives here), restored by `restore_latest` (a corrupt newest checkpoint
falls back to the previous one) and written by `save` on every process. `Preemption` turns SIGTERM
(a preempted spot VM) into a request the training loops check at each step.

Finished nets (teachers and child nets) are directories holding `variables/` (an Orbax
StandardCheckpointer tree) and a JSON meta file written last, so that its presence marks a complete
checkpoint (`save_variables`, `load_variables`). Child checkpoints (`meta.json`) record the
architecture, classes, image size, conventions and input normalization (`child_meta`); they are
written by the retrain stage and `dna_jax.convert_authors`, read by evaluation and export.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import signal
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dna_jax import files
from dna_jax import images as images_lib
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import child
from dna_jax.models import layers

VARIABLES_DIR = 'variables'
CHILD_META = 'meta.json'

# ----------------------------------------------------------------------------- training checkpoints


def manager(directory: str | epath.Path, max_to_keep: int) -> ocp.CheckpointManager:
  """An Orbax manager for `directory` (created if missing).

  Asynchronous saves on one process only: with several processes, several managers saving at once
  deadlocked in Orbax's async finalize barrier.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=jax.process_count() == 1
  )
  return ocp.CheckpointManager(workdir_lib.as_path(directory), options=options)


def restore_latest(checkpoints: ocp.CheckpointManager, target: Any, where: str) -> tuple[Any, dict[str, Any]] | None:
  """(state, meta) of the newest readable checkpoint, or None; a corrupt newest one is skipped with a warning."""
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      restored = checkpoints.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
      )
      return restored['state'], restored['meta']
    except Exception as e:
      logging.warning('%s: checkpoint at step %d is unreadable (%s); trying the previous one.', where, step, e)
  return None


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Saves `state` and `meta` at `step`, on every process (Orbax synchronises them; process 0 writes)."""
  # Host copies: a step's outputs are replicated over every device, and Orbax would slice each replica.
  checkpoints.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(parallel.host_copy(state)), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


class Preemption:
  """While active (a context manager), SIGTERM asks the training loop to save and stop."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self) -> Preemption:
    self._previous = signal.signal(signal.SIGTERM, self)
    return self

  def __exit__(self, *exc_info) -> None:
    signal.signal(signal.SIGTERM, self._previous)

  def check(self, step: int, *managers: ocp.CheckpointManager) -> bool:
    """True once SIGTERM arrived or Orbax reports a preemption at `step` (then it stays True)."""
    self.requested = self.requested or any(m.reached_preemption(step) for m in managers)
    return self.requested


# ----------------------------------------------------------------------------- variable directories


def save_variables(
  directory: str | epath.Path, variables: Mapping[str, Any], meta: Mapping[str, Any], meta_name: str
) -> epath.Path:
  """Writes `variables` to DIRECTORY/variables and `meta` to DIRECTORY/meta_name last, replacing both.

  Call on every process. The old meta file goes first, so an interrupted overwrite never leaves a
  checkpoint that looks complete.
  """
  path = workdir_lib.as_path(directory)
  host = jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), flax.core.unfreeze(variables)
  )
  if jax.process_index() == 0:
    if (path / meta_name).exists():
      (path / meta_name).unlink()
    if (path / VARIABLES_DIR).exists():
      (path / VARIABLES_DIR).rmtree()
  path.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES_DIR, host)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    files.write_json(path / meta_name, dict(meta))
  return path


def load_variables(directory: str | epath.Path, target: Any = None) -> Any:
  """The variables of DIRECTORY/variables (shaped like `target` when given)."""
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(workdir_lib.as_path(directory) / VARIABLES_DIR, target)
  checkpointer.close()
  return variables


def stored_shapes(directory: str | epath.Path) -> dict[str, tuple[int, ...]]:
  """{'collection/path/name': shape} of DIRECTORY/variables, read from its metadata (no arrays loaded)."""
  tree = ocp.StandardCheckpointer().metadata(workdir_lib.as_path(directory) / VARIABLES_DIR).item_metadata.tree
  return {'/'.join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


# ----------------------------------------------------------------------------- child checkpoints


def child_meta(
  arch: space_lib.Architecture,
  num_classes: int,
  image_size: int,
  conventions: layers.Conventions,
  normalization: str,
  stem_stride: int = 2,
  **extra: Any,
) -> dict[str, Any]:
  """The meta.json record of a child checkpoint; `normalization` is what the net reads (images.py)."""
  images_lib.check_normalization(normalization)
  return {
    'arch': space_lib.to_string(arch),
    'num_classes': int(num_classes),
    'image_size': int(image_size),
    'stem_stride': int(stem_stride),
    'conventions': {
      'padding': conventions.padding,
      'bn_epsilon': conventions.bn_epsilon,
      'bn_momentum': conventions.bn_momentum,
    },
    'normalization': normalization,
    **extra,
  }


def child_from_meta(
  meta: Mapping[str, Any], *, dtype: Any = jnp.float32, depthwise: str = 'auto', bn_axis_name: str | None = None
) -> child.ChildNet:
  """The ChildNet (inference settings: no dropout or drop-connect) a meta record describes."""
  missing = [k for k in ('arch', 'num_classes', 'image_size', 'conventions', 'normalization') if k not in meta]
  if missing:
    raise ValueError(f'child checkpoint meta lacks {", ".join(missing)}')
  conv = meta['conventions']
  conventions = layers.Conventions(
    padding=conv['padding'],
    bn_epsilon=float(conv['bn_epsilon']),
    bn_momentum=float(conv.get('bn_momentum', 0.99)),
    depthwise=depthwise,
    dtype=dtype,
  )
  return child.ChildNet(
    space_lib.from_string(meta['arch']),
    int(meta['num_classes']),
    dropout_rate=0.0,
    drop_connect_rate=0.0,
    stem_stride=int(meta.get('stem_stride', 2)),
    conventions=conventions,
    bn_axis_name=bn_axis_name,
  )


def save_child(directory: str | epath.Path, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> epath.Path:
  """Writes a child checkpoint ({'params', 'batch_stats'} and meta.json last). Call on every process."""
  child_from_meta(meta)  # validates the meta before anything is written
  kept = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return save_variables(directory, kept, meta, CHILD_META)


def is_child(directory: str | epath.Path) -> bool:
  """True when `directory` holds a complete child checkpoint."""
  path = workdir_lib.as_path(directory)
  return (path / CHILD_META).exists() and (path / VARIABLES_DIR).exists()


def load_child(
  directory: str | epath.Path, *, dtype: Any = jnp.float32, depthwise: str = 'auto', bn_axis_name: str | None = None
) -> tuple[child.ChildNet, dict[str, Any], dict[str, Any]]:
  """(model, variables, meta) of a child checkpoint; every variable's shape is checked against the meta's net."""
  path = workdir_lib.as_path(directory)
  if not is_child(path):
    raise FileNotFoundError(
      f'{directory} is not a child checkpoint: expected {CHILD_META} and {VARIABLES_DIR}/ '
      '(written by the retrain stage or dna_jax.convert_authors)'
    )
  meta = json.loads((path / CHILD_META).read_text())
  model = child_from_meta(meta, dtype=dtype, depthwise=depthwise, bn_axis_name=bn_axis_name)
  variables = load_variables(path)
  expected = jax.eval_shape(lambda: child.init_child(model, jax.random.PRNGKey(0), int(meta['image_size'])))
  got = {'/'.join(k): tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(variables).items()}
  want = {'/'.join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(dict(expected)).items()}
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise ValueError(
        f'{directory}: variable {name} is {got.get(name, "missing")}, but the architecture '
        f'{meta["arch"]!r} of its meta.json needs {want.get(name, "no such variable")}'
      )
  return model, variables, meta
