"""Rate every path of every cell against the teacher, sharing work between paths.

For each path, BatchNorm statistics are recalibrated from one batch of training
images fed through that path (DNA's recalibration), then the path is scored on the
held-out rating split: relative L1 (mean |S - T| / std(T)) and MSE.

Paths that share their first layers share those layers' activations and recalibrated
statistics: the cell is evaluated as a prefix tree, level by level, so a 4-layer cell
costs 6 + 36 + 216 + 1296 = 1554 layer evaluations per batch instead of 4 x 1296.
The last `d` levels of the tree (6**d <= chunk_size leaves) run as one jitted call
that vmaps every op over the prefixes; the first levels are walked depth-first with
their activations cached. The teacher runs once per batch for all cells.

`rate_cell` is a pure function of (variables, calibration inputs, rating batches).
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import functools
import math
import time
from typing import Any

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import layers
from dna_jax.models import supernet

Array = jax.Array
NUM_OPS = space_lib.NUM_OPS


def for_rating(cell: supernet.SupernetCell, axis_name: str | None) -> supernet.SupernetCell:
  """The cell with BN momentum 0: a train-mode pass sets running stats to the batch's own (recalibration)."""
  return dataclasses.replace(
    cell, conventions=dataclasses.replace(cell.conventions, bn_momentum=0.0), bn_axis_name=axis_name
  )


def _op_pair(cell, variables, l, op_id, calib, inputs):
  """Op `op_id` of layer l: recalibrate on `calib`, then apply to `inputs` with those statistics."""
  calib_out, stats = cell.apply_op(variables, l, op_id, calib, train=True)
  name = space_lib.OP_NAMES[op_id]
  eval_vars = {
    'params': variables['params'],
    'batch_stats': {**variables['batch_stats'], f'layer{l}': {**variables['batch_stats'][f'layer{l}'], name: stats}},
  }
  out, _ = cell.apply_op(eval_vars, l, op_id, inputs, train=False)
  return calib_out, out


def expand_level(
  cell: supernet.SupernetCell, variables: Any, l: int, calib: Array, inputs: Array
) -> tuple[Array, Array]:
  """Every op of layer l applied to every prefix: (P, ...) -> (P * 6, ...), path-major order."""
  outs_c, outs_e = [], []
  for op_id in range(NUM_OPS):
    c, e = jax.vmap(functools.partial(_op_pair, cell, variables, l, op_id))(calib, inputs)
    outs_c.append(c)
    outs_e.append(e)
  stack = lambda xs: jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:])
  return stack(outs_c), stack(outs_e)


def path_errors(outputs: Array, target: Array, mask: Array) -> tuple[Array, Array]:
  """Per path sums over the batch of |S - T| and (S - T)^2 (masked examples excluded)."""
  diff = outputs.astype(jnp.float32) - target.astype(jnp.float32)[None]
  weight = mask.astype(jnp.float32).reshape((1, -1) + (1,) * (diff.ndim - 2))
  axes = tuple(range(1, diff.ndim))
  return jnp.sum(jnp.abs(diff) * weight, axes), jnp.sum(jnp.square(diff) * weight, axes)


def subtree_errors(
  cell: supernet.SupernetCell, first_level: int, variables: Any, calib: Array, inputs: Array, target: Array, mask: Array
) -> tuple[Array, Array]:
  """All 6**(L - first_level) completions of one prefix, vmapped level by level."""
  calib, inputs = calib[None], inputs[None]
  for l in range(first_level, cell.cell.layers):
    calib, inputs = expand_level(cell, variables, l, calib, inputs)
  sums = path_errors(inputs, target, mask)
  return tuple(lax.psum(s, parallel.AXIS) for s in sums) if cell.bn_axis_name else sums


def single_op(
  cell: supernet.SupernetCell, l: int, op_id: int, variables: Any, calib: Array, inputs: Array
) -> tuple[Array, Array]:
  return _op_pair(cell, variables, l, op_id, calib, inputs)


def stem_pair(cell: supernet.SupernetCell, variables: Any, calib: Array, inputs: Array) -> tuple[Array, Array]:
  """Block 1's stem + DS block, recalibrated on `calib` like every other layer."""
  calib_out, stats = cell.apply_stem(variables, calib, train=True)
  out, _ = cell.apply_stem(
    {'params': variables['params'], 'batch_stats': {**variables['batch_stats'], **stats}}, inputs, train=False
  )
  return calib_out, out


@functools.cache
def compiled(kind: str, cell: supernet.SupernetCell, mode: str | None, *static: int):
  """Jitted (and, with a mode, device-parallel) building blocks, cached per cell shape."""
  fns = {
    'subtree': lambda: functools.partial(subtree_errors, cell, *static),
    'op': lambda: functools.partial(single_op, cell, *static),
    'stem': lambda: functools.partial(stem_pair, cell),
  }
  fn = fns[kind]()
  if mode is None:
    return jax.jit(fn)
  num_args = 5 if kind == 'subtree' else 3
  in_specs = (jax.P(),) + (jax.P(parallel.AXIS),) * (num_args - 1)
  out_specs = (jax.P(), jax.P()) if kind == 'subtree' else (jax.P(parallel.AXIS), jax.P(parallel.AXIS))
  return jax.jit(jax.shard_map(fn, mesh=parallel.make_mesh(), in_specs=in_specs, out_specs=out_specs, check_vma=False))


def trailing_levels(num_layers: int, chunk_size: int) -> int:
  """How many last levels run as one vmapped call (6**d <= chunk_size, at least 1)."""
  return max(1, min(num_layers, math.floor(math.log(max(chunk_size, NUM_OPS)) / math.log(NUM_OPS) + 1e-9)))


def rate_cell(
  cell: supernet.SupernetCell,
  variables: Any,
  calib: Array,
  inputs: Array,
  target: Array,
  mask: Array,
  chunk_size: int = 216,
  mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-path sums of |S - T| and (S - T)^2 over one rating batch, every path of the cell.

  `calib`: the cell's input for the recalibration batch; `inputs`/`target`/`mask`: the
  rating batch (cell input, teacher output, 1 for real examples). Returns float64 arrays
  of length 6**layers in `cell.paths()` order. With `mode='shard_map'` the batches are
  sharded over all devices and BatchNorm recalibration uses the whole calibration batch.
  """
  if mode is not None and cell.bn_axis_name is None:
    cell = dataclasses.replace(cell, bn_axis_name=parallel.AXIS)
  layers_ = cell.cell.layers
  d = trailing_levels(layers_, chunk_size)
  lead = layers_ - d
  abs_sums, sq_sums = [], []
  if cell.stem is not None:
    calib, inputs = compiled('stem', cell, mode)(variables, calib, inputs)

  def walk(level: int, calib: Array, inputs: Array) -> None:
    if level == lead:
      a, s = compiled('subtree', cell, mode, lead)(variables, calib, inputs, target, mask)
      abs_sums.append(np.asarray(a, np.float64))
      sq_sums.append(np.asarray(s, np.float64))
      return
    for op_id in range(NUM_OPS):
      walk(level + 1, *compiled('op', cell, mode, level, op_id)(variables, calib, inputs))

  walk(0, calib, inputs)
  return np.concatenate(abs_sums), np.concatenate(sq_sums)


def naive_path_errors(
  cell: supernet.SupernetCell,
  variables: Any,
  path: tuple[int, ...],
  calib: Array,
  inputs: Array,
  target: Array,
  mask: Array,
) -> tuple[float, float]:
  """Reference: one path alone, layer after layer (what `rate_cell` must equal)."""
  if cell.stem is not None:
    calib, inputs = stem_pair(cell, variables, calib, inputs)
  for l, op_id in enumerate(path):
    calib, inputs = _op_pair(cell, variables, l, op_id, calib, inputs)
  a, s = path_errors(inputs[None], target, mask)
  return float(a[0]), float(s[0])


@dataclasses.dataclass
class Accumulator:
  """Running sums for one block: per-path error sums and the teacher's moments."""

  abs_sums: dict[int, np.ndarray]
  sq_sums: dict[int, np.ndarray]
  target_sum: float = 0.0
  target_sq_sum: float = 0.0
  count: float = 0.0  # target elements seen

  def scores(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    mean = self.target_sum / self.count
    std = math.sqrt(max(self.target_sq_sum / self.count - mean * mean, 0.0)) + 1e-12
    score = {c: (a / self.count) / std for c, a in self.abs_sums.items()}
    mse = {c: s / self.count for c, s in self.sq_sums.items()}
    return score, mse


@jax.jit
def target_moments(target: Array, mask: Array) -> tuple[Array, Array]:
  """Masked sum and sum of squares of the teacher features (global over devices)."""
  t = target.astype(jnp.float32).reshape(target.shape[0], -1)
  m = mask.astype(jnp.float32)
  return jnp.sum(t.sum(1) * m), jnp.sum(jnp.square(t).sum(1) * m)


def rate_blocks(
  config: ml_collections.ConfigDict,
  teacher_apply: Any,
  teacher_variables: Any,
  cells: list[list[supernet.SupernetCell]],
  variables: dict[int, list[Any]],
  calib_batch: dict[str, np.ndarray],
  batches: Iterable[dict[str, np.ndarray]],
  num_batches: int | None,
  mode: str | None,
) -> dict[int, Accumulator]:
  """Accumulates every path of every cell of the given blocks over the rating batches."""
  block_ids = sorted(variables)
  t_apply = jax.jit(teacher_apply)
  prepare = (
    (lambda x: jnp.asarray(np.reshape(x, (-1,) + x.shape[2:])))
    if mode is None
    else (lambda x: parallel.shard_batch({'x': x}, 'shard_map')['x'])
  )
  calib_images = prepare(calib_batch['image'])
  calib_features = t_apply(teacher_variables, calib_images)
  acc = {
    k: Accumulator(dict.fromkeys(range(len(cells[k])), 0.0), dict.fromkeys(range(len(cells[k])), 0.0))
    for k in block_ids
  }
  rating_cells = {k: [for_rating(cell, None) for cell in cells[k]] for k in block_ids}
  start = time.time()
  for done, batch in enumerate(batches, start=1):
    images, mask = prepare(batch['image']), prepare(batch['mask'])
    features = t_apply(teacher_variables, images)
    mask_np = np.asarray(batch['mask'], np.float64).reshape(-1)
    for k in block_ids:
      target = features[f'block{k + 1}']
      calib = calib_images if k == 0 else calib_features[f'block{k}']
      inputs = images if k == 0 else features[f'block{k}']
      total, total_sq = target_moments(target, mask)
      acc[k].target_sum += float(total)
      acc[k].target_sq_sum += float(total_sq)
      acc[k].count += float(mask_np.sum() * math.prod(target.shape[1:]))
      for c, cell in enumerate(rating_cells[k]):
        a, s = rate_cell(cell, variables[k][c], calib, inputs, target, mask, config.rate.chunk_size, mode)
        acc[k].abs_sums[c] = acc[k].abs_sums[c] + a
        acc[k].sq_sums[c] = acc[k].sq_sums[c] + s
    elapsed = time.time() - start
    eta = f', ETA {elapsed / done * (num_batches - done):.0f} s' if num_batches else ''
    logging.info('rating batch %d%s done in %.1f s%s', done, f'/{num_batches}' if num_batches else '', elapsed, eta)
  return acc


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The rate stage: writes WORKDIR/ratings/block_K.csv for every block not rated yet."""
  space = space_lib.space_from_config(config.space)
  ratings_dir = str(workdir_lib.Workdir(workdir).ratings)
  block_ids = [
    k
    for k in space_lib.parse_block_numbers(config.rate.blocks, len(space.blocks), 'rate.blocks')
    if not ratings_lib.block_complete(ratings_dir, k)
  ]
  num_classes = input_pipeline.check_dataset(config.data)
  if not block_ids:
    logging.info('Every block is rated already in %s.', ratings_dir)
    return {}
  teacher_model, teacher_variables = teacher_lib.load_for_run(config, workdir)
  conventions = layers.conventions_from_config(config.model)
  cells = supernet.supernet_cells(space, conventions=conventions, stem_stride=config.space.stem_stride)
  variables = {}
  for k in block_ids:
    stored = supernet_store.load_cells(workdir, k)
    if sorted(stored) != list(range(len(cells[k]))):
      raise ValueError(
        f'the distilled block {k + 1} in {workdir} holds cells {sorted(stored)} but the space has '
        f'{len(cells[k])}: distil it with this space'
      )
    variables[k] = [stored[c] for c in range(len(cells[k]))]
  mode = 'shard_map' if jax.device_count() > 1 else None
  if mode:
    parallel.check_global_batch(config.rate.batch_size, 'rate.batch_size')
    parallel.check_global_batch(config.rate.calib_batch_size, 'rate.calib_batch_size')
  teacher_apply = functools.partial(
    teacher_lib.teacher_features,
    teacher_model,
    up_to=max(block_ids) + 1,
    train_mode_bn=config.teacher.train_mode_bn,
  )
  calib_batch = next(input_pipeline.create_split(config.data, 'calib', config.rate.calib_batch_size))
  examples = input_pipeline.num_examples(config.data, 'rate')
  num_batches = -(-examples // config.rate.batch_size) if examples else None
  batches = input_pipeline.create_split(config.data, 'rate', config.rate.batch_size)
  start = time.time()
  acc = rate_blocks(config, teacher_apply, teacher_variables, cells, variables, calib_batch, batches, num_batches, mode)
  seconds = time.time() - start
  paths = 0
  for k in block_ids:
    score, mse = acc[k].scores()
    if jax.process_index() == 0:
      ratings_lib.write_block_ratings(
        ratings_dir,
        space,
        k,
        score,
        mse,
        resolution=config.data.image_size,
        num_classes=num_classes,
        stem_stride=config.space.stem_stride,
      )
    paths += sum(len(s) for s in score.values())
  logging.info('Rated %d paths in %.1f s (%.1f paths/s).', paths, seconds, paths / seconds)
  return {'paths': paths, 'seconds': round(seconds, 1)}
