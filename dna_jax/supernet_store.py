"""The distilled supernet on disk: block states, their optimizer, and reading the cells back.

Distillation keeps one `BlockState` per block (every cell's parameters, BatchNorm statistics and
Adam state) in its own Orbax manager, WORKDIR/distill/block_K, so that blocks train, resume and are
rated independently. The distill stage writes them (`block_manager`, `restore_block`, `save_block`);
the rate and retrain stages read the cells' variables with `load_cells`, without any optimizer.
`link_opt_state` and `block_opt_state` split a block's optimizer state by link and put it back
together (the per-layer distillation step updates each link on its own).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax
from flax import struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from dna_jax import checkpoints
from dna_jax import images as images_lib
from dna_jax import run_once
from dna_jax import workdir as workdir_lib
from dna_jax.models import supernet

Array = jax.Array


class BlockState(struct.PyTreeNode):
  """Every cell of one block ('cell0', 'cell1', ...): parameters, BatchNorm statistics, optimizer state."""

  step: Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: Any


def student_normalization(config: Any) -> tuple[str, str] | None:
  """(data's, model's) normalization when block 1 of the supernet must convert its images, else None.

  The teacher reads images as the data holds them (data.normalization); the student, like the child
  net it becomes, reads model.normalization.
  """
  source = images_lib.check_normalization(config.data.normalization, 'data.normalization')
  target = images_lib.check_normalization(config.model.normalization, 'model.normalization')
  return None if source == target else (source, target)


def kernel_mask(params: Any) -> Any:
  """True on conv/dense kernels: the only leaves that get weight decay."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == 'kernel', params)


def block_optimizer(learning_rate_fn: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
  """DNA's: Adam with L2 weight decay added to the gradient (as torch.optim.Adam does) on kernels only."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=kernel_mask),
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(learning_rate_fn),
  )


def _block_tree_test(params: dict[str, Any]) -> Callable[[Any], bool]:
  """Whether a node of a block's optimizer state is a tree shaped like the block's parameters (cell keys)."""
  keys = params.keys()
  return lambda node: isinstance(node, dict) and node.keys() == keys


def link_opt_state(opt_state: Any, params: dict[str, Any], cell: str, link: str) -> Any:
  """The part of a block's optimizer state that belongs to one link: its own statistics, the shared counts."""
  is_block_tree = _block_tree_test(params)
  return jax.tree.map(lambda node: node[cell][link] if is_block_tree(node) else node, opt_state, is_leaf=is_block_tree)


def block_opt_state(template: Any, params: dict[str, Any], link_states: dict[tuple[str, str], Any]) -> Any:
  """The block's optimizer state assembled from every link's (`link_opt_state`'s inverse), counts from any link.

  `template`: the block's state before the step (only its structure is read).
  """
  is_block_tree = _block_tree_test(params)
  names = list(link_states)

  def assemble(node: Any, *parts: Any) -> Any:
    if not is_block_tree(node):
      return parts[0]  # a count: every link advanced it alike
    tree = {cell: {} for cell in node}
    for (cell, link), part in zip(names, parts):
      tree[cell][link] = part
    return tree

  return jax.tree.map(assemble, template, *link_states.values(), is_leaf=is_block_tree)


def create_block_state(
  rng: Array, cells: Sequence[supernet.SupernetCell], input_size: int, optimizer: optax.GradientTransformation
) -> BlockState:
  """Fresh variables for every cell of a block (shapes from a one-image example input)."""
  params, stats = {}, {}
  for c, cell in enumerate(cells):
    variables = cell.init(jax.random.fold_in(rng, c), supernet.zeros_like_input(cell, 1, input_size))
    params[f'cell{c}'], stats[f'cell{c}'] = variables['params'], variables['batch_stats']
  # One program for the optimizer state: run eagerly, optax compiles a zeros program per distinct
  # parameter shape (196 for the default ImageNet space), about a second each on an H200.
  return BlockState(jnp.zeros((), jnp.int32), params, stats, run_once.jit(optimizer.init)(params))


def abstract_block_state(
  cells: Sequence[supernet.SupernetCell], input_size: int, optimizer: optax.GradientTransformation
) -> BlockState:
  """`create_block_state`'s shapes and dtypes on this process's first device, computing nothing.

  The restore target of a resumed block: it costs tracing the initializers, not compiling them.
  """
  shapes = jax.eval_shape(lambda: create_block_state(jax.random.PRNGKey(0), cells, input_size, optimizer))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), shapes)


def block_manager(workdir: str, block_index: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The Orbax manager of WORKDIR/distill/block_K (K = block_index + 1)."""
  return checkpoints.manager(workdir_lib.Workdir(workdir).distill_block(block_index), max_to_keep)


def restore_block(
  manager: ocp.CheckpointManager, target: BlockState, block_index: int
) -> tuple[BlockState, dict[str, Any]] | None:
  """(state, meta) of the block's newest readable checkpoint, shaped like `target`; None if there is none."""
  return checkpoints.restore_latest(manager, target, f'block{block_index + 1}')


def save_block(manager: ocp.CheckpointManager, state: BlockState, meta: dict[str, Any]) -> None:
  """Saves a block at its own step, on every process."""
  checkpoints.save(manager, int(state.step), state, meta)


def load_cells(workdir: str, block_index: int) -> dict[int, dict[str, Any]]:
  """{cell index: {'params', 'batch_stats'}} of a distilled block, from its newest readable checkpoint."""
  directory = workdir_lib.Workdir(workdir).distill_block(block_index)
  if not directory.exists():
    raise FileNotFoundError(
      f'no distilled checkpoint for block {block_index + 1} in {directory}: run the distill stage first'
    )
  manager = checkpoints.manager(directory, max_to_keep=1_000_000)  # reading only: never deletes
  restored = checkpoints.restore_latest(manager, None, f'block{block_index + 1}')
  manager.close()
  if restored is None:
    raise FileNotFoundError(f'no readable distilled checkpoint for block {block_index + 1} in {directory}')
  state = restored[0]
  return {
    int(name.removeprefix('cell')): {'params': state['params'][name], 'batch_stats': state['batch_stats'][name]}
    for name in state['params']
  }
