"""Rating every path of one cell against the teacher, sharing work between paths.

For each path, BatchNorm statistics are recalibrated from one batch of training images fed
through that path (DNA's recalibration). They depend on the calibration batch only: they are
computed once per cell (`calibrate_cell`) and reused for every rating batch (`rate_cell`); the
authors recalibrate every path for every batch, which with as many calibration as rating images is
half the work.

Paths that share their first layers share those layers' activations and recalibrated statistics:
the cell is evaluated as a prefix tree, level by level, so a 4-layer cell costs 6 + 36 + 216 + 1296
= 1554 layer evaluations per batch instead of 4 x 1296. The last `d` levels of the tree
(6**d <= chunk_size leaves) run as one jitted call that vmaps every op over the prefixes; the first
levels are walked depth-first with their activations cached. When adaptive rating has stopped some
paths, a trailing subtree runs each op vmapped over only the nodes that lead to a surviving path.

`calibrate_cell` and `rate_cell` are pure functions of (variables, calibration inputs) and
(variables, calibration, rating batch); `naive_path_errors` is the one-path-at-a-time reference
they must equal. The rate stage (stages/rate.py) runs them over every cell and rating batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax.models import supernet

Array = jax.Array
NUM_OPS = space_lib.NUM_OPS


def for_rating(cell: supernet.SupernetCell, axis_name: str | None) -> supernet.SupernetCell:
  """The cell with BN momentum 0: a train-mode pass sets running stats to the batch's own (recalibration)."""
  return dataclasses.replace(
    cell, conventions=dataclasses.replace(cell.conventions, bn_momentum=0.0), bn_axis_name=axis_name
  )


def calibrate_op(cell: supernet.SupernetCell, l: int, op_id: int, variables: Any, calib: Array) -> tuple[Array, Any]:
  """Op `op_id` of layer l on the calibration inputs in training mode: (output, recalibrated statistics)."""
  return cell.apply_op(variables, l, op_id, calib, train=True)


def apply_op(cell: supernet.SupernetCell, l: int, op_id: int, variables: Any, stats: Any, inputs: Array) -> Array:
  """Op `op_id` of layer l on `inputs` in inference mode with the recalibrated `stats`."""
  name = space_lib.OP_NAMES[op_id]
  eval_vars = {
    'params': variables['params'],
    'batch_stats': {**variables['batch_stats'], f'layer{l}': {**variables['batch_stats'][f'layer{l}'], name: stats}},
  }
  return cell.apply_op(eval_vars, l, op_id, inputs, train=False)[0]


def _op_pair(cell, variables, l, op_id, calib, inputs):
  """Op `op_id` of layer l: recalibrate on `calib`, then apply to `inputs` with those statistics."""
  calib_out, stats = calibrate_op(cell, l, op_id, variables, calib)
  return calib_out, apply_op(cell, l, op_id, variables, stats, inputs)


def _stack_paths(xs: list[Array]) -> Array:
  """Per-op outputs (ops of (P, ...)) -> (P * ops, ...), path-major order."""
  return jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:])


def calibrate_level(cell: supernet.SupernetCell, variables: Any, l: int, calib: Array) -> tuple[Array, tuple[Any, ...]]:
  """Every op layer l may take, on every prefix's calibration activations (P, ...): the outputs
  (P * ops, ...) path-major, and per op its statistics for each prefix (leading axis P)."""
  outs, stats = [], []
  for op_id in cell.cell.layer_ops(l):
    c, s = jax.vmap(functools.partial(calibrate_op, cell, l, op_id, variables))(calib)
    outs.append(c)
    stats.append(s)
  return _stack_paths(outs), tuple(stats)


def apply_level(cell: supernet.SupernetCell, variables: Any, l: int, stats: tuple[Any, ...], inputs: Array) -> Array:
  """calibrate_level's ops in inference mode with its statistics: (P, ...) -> (P * ops, ...)."""
  outs = [
    jax.vmap(functools.partial(apply_op, cell, l, op_id, variables))(s, inputs)
    for op_id, s in zip(cell.cell.layer_ops(l), stats)
  ]
  return _stack_paths(outs)


def group_onehot(batch: int, num_groups: int, first_index: Array | int = 0) -> Array:
  """(batch, num_groups) one-hot of each example's group: its index in the global batch modulo num_groups."""
  group = (first_index + jnp.arange(batch)) % num_groups
  return (group[:, None] == jnp.arange(num_groups)[None]).astype(jnp.float32)


def path_errors(
  outputs: Array, target: Array, mask: Array, num_groups: int = 1, first_index: Array | int = 0
) -> tuple[Array, Array]:
  """Per path and group of examples, sums of |S - T| and (S - T)^2: (paths, num_groups) each.

  Example i of the global batch (`first_index` is this shard's first) is in group i % num_groups; the
  groups give adaptive rating paired differences on the same images. Padded examples (mask 0) never count.
  """
  diff = outputs.astype(jnp.float32) - target.astype(jnp.float32)[None]
  real = mask.reshape((1, -1) + (1,) * (diff.ndim - 2)) > 0
  diff = jnp.where(real, diff, 0.0)  # not a product: whatever a padded example holds (even NaN) is dropped
  axes = tuple(range(2, diff.ndim))
  onehot = group_onehot(diff.shape[1], num_groups, first_index)
  return jnp.sum(jnp.abs(diff), axes) @ onehot, jnp.sum(jnp.square(diff), axes) @ onehot


def _shard_errors(cell: supernet.SupernetCell, outputs: Array, target: Array, mask: Array, num_groups: int):
  """path_errors of this shard, summed over every device when the cell runs under shard_map."""
  if not cell.bn_axis_name:
    return path_errors(outputs, target, mask, num_groups)
  first = lax.axis_index(parallel.AXIS) * target.shape[0]
  return tuple(lax.psum(s, parallel.AXIS) for s in path_errors(outputs, target, mask, num_groups, first))


def subtree_stats(cell: supernet.SupernetCell, first_level: int, variables: Any, calib: Array) -> tuple[Any, ...]:
  """calibrate_level's statistics for every level of one prefix's trailing subtree, vmapped level by level."""
  calib, stats = calib[None], []
  for l in range(first_level, cell.cell.layers):
    calib, level_stats = calibrate_level(cell, variables, l, calib)
    stats.append(level_stats)
  return tuple(stats)


def subtree_errors(
  cell: supernet.SupernetCell,
  first_level: int,
  num_groups: int,
  variables: Any,
  stats: tuple[Any, ...],
  inputs: Array,
  target: Array,
  mask: Array,
) -> tuple[Array, Array]:
  """All 6**(L - first_level) completions of one prefix (its `subtree_stats`), vmapped level by level."""
  inputs = inputs[None]
  for l, level_stats in zip(range(first_level, cell.cell.layers), stats):
    inputs = apply_level(cell, variables, l, level_stats, inputs)
  return _shard_errors(cell, inputs, target, mask, num_groups)


def apply_prefixes(cell: supernet.SupernetCell, l: int, op_id: int, variables: Any, stats: Any, inputs: Array) -> Array:
  """Op `op_id` of layer l on several prefixes at once: statistics and activations with a leading prefix axis."""
  return jax.vmap(functools.partial(apply_op, cell, l, op_id, variables))(stats, inputs)


def leaves_errors(
  cell: supernet.SupernetCell,
  l: int,
  op_id: int,
  num_groups: int,
  variables: Any,
  stats: Any,
  inputs: Array,
  target: Array,
  mask: Array,
) -> tuple[Array, Array]:
  """Several paths ending in op `op_id` of the last layer l: apply_prefixes, then their errors (paths, groups)."""
  return _shard_errors(cell, apply_prefixes(cell, l, op_id, variables, stats, inputs), target, mask, num_groups)


def calibrate_stem(cell: supernet.SupernetCell, variables: Any, calib: Array) -> tuple[Array, Any]:
  """Block 1's stem + DS block on the calibration inputs: (output, recalibrated statistics)."""
  return cell.apply_stem(variables, calib, train=True)


def apply_stem(cell: supernet.SupernetCell, variables: Any, stats: Any, inputs: Array) -> Array:
  stem_vars = {'params': variables['params'], 'batch_stats': {**variables['batch_stats'], **stats}}
  return cell.apply_stem(stem_vars, inputs, train=False)[0]


def stem_pair(cell: supernet.SupernetCell, variables: Any, calib: Array, inputs: Array) -> tuple[Array, Array]:
  """Block 1's stem + DS block, recalibrated on `calib` like every other layer."""
  calib_out, stats = calibrate_stem(cell, variables, calib)
  return calib_out, apply_stem(cell, variables, stats, inputs)


_SHARDED, _REPLICATED = jax.P(parallel.AXIS), jax.P()
_PREFIX_SHARDED = jax.P(None, parallel.AXIS)  # (prefixes, batch, ...): the batch sharded
# kind: (function, specs of the arguments after `variables`, specs of the outputs) under shard_map.
# Recalibrated statistics come out of a cross-device BatchNorm equal on every device: replicated.
_KINDS = {
  'calibrate_stem': (calibrate_stem, (_SHARDED,), (_SHARDED, _REPLICATED)),
  'apply_stem': (apply_stem, (_REPLICATED, _SHARDED), _SHARDED),
  'calibrate_op': (calibrate_op, (_SHARDED,), (_SHARDED, _REPLICATED)),
  'apply_op': (apply_op, (_REPLICATED, _SHARDED), _SHARDED),
  'calibrate_subtree': (subtree_stats, (_SHARDED,), _REPLICATED),
  'subtree': (subtree_errors, (_REPLICATED,) + (_SHARDED,) * 3, (_REPLICATED, _REPLICATED)),
  'prefixes': (apply_prefixes, (_REPLICATED, _PREFIX_SHARDED), _PREFIX_SHARDED),
  'leaves': (leaves_errors, (_REPLICATED, _PREFIX_SHARDED, _SHARDED, _SHARDED), (_REPLICATED, _REPLICATED)),
}


@functools.cache
def compiled(kind: str, cell: supernet.SupernetCell, mode: str | None, *static: int):
  """Jitted (and, with a mode, device-parallel) building blocks, cached per cell shape."""
  fn, in_specs, out_specs = _KINDS[kind]
  fn = functools.partial(fn, cell, *static)
  if mode is None:
    return jax.jit(fn)
  mesh = parallel.make_mesh()
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(_REPLICATED,) + in_specs, out_specs=out_specs, check_vma=False))


@jax.jit
def _take(tree: Any, index: Array) -> Any:
  return jax.tree.map(lambda x: x[index], tree)


def _padded_size(n: int, cap: int) -> int:
  """n rounded up to 1, 2, 3, 4, 6, 8, 12, ... (2**k or 3 * 2**(k-1): at most 1.5x n), and at most `cap`:
  a handful of program shapes instead of one per count."""
  return min(cap, next(b for k in itertools.count() for b in (2**k, 3 * 2**k // 2) if b >= n))


def _suffix_index(cell: supernet.SupernetCell, lead: int, suffix: tuple[int, ...]) -> int:
  """A trailing-subtree node's position among its level's nodes (path-major), as in Calibration.subtrees."""
  index = 0
  for l, op_id in enumerate(suffix, lead):
    ops = cell.cell.layer_ops(l)
    index = index * len(ops) + ops.index(op_id)
  return index


SparsePlan = list[tuple[list[tuple[int, ...]], list[tuple[int, list[int]]]]]


def _sparse_plan(
  cell: supernet.SupernetCell, lead: int, prefix: tuple[int, ...], under: collections.Counter
) -> SparsePlan:
  """Per trailing level: its surviving parents (suffixes below `prefix`), and for each op used the
  positions of the parents that need it; a level's parents are the previous level's children in the
  order listed."""
  plan, suffixes = [], [()]
  for l in range(lead, cell.cell.layers):
    uses, children = [], []
    for op_id in cell.cell.layer_ops(l):
      parents = [i for i, s in enumerate(suffixes) if under[prefix + s + (op_id,)]]
      if parents:
        uses.append((op_id, parents))
        children += [suffixes[i] + (op_id,) for i in parents]
    plan.append((suffixes, uses))
    suffixes = children
  return plan


def _planned_nodes(plan: SparsePlan, cap: int) -> int:
  """Node evaluations of a sparse plan, padding included."""
  return sum(_padded_size(len(parents), cap) for _, uses in plan for _, parents in uses)


def trailing_levels(num_layers: int, chunk_size: int) -> int:
  """How many last levels run as one vmapped call (6**d <= chunk_size, at least 1)."""
  return max(1, min(num_layers, math.floor(math.log(max(chunk_size, NUM_OPS)) / math.log(NUM_OPS) + 1e-9)))


def _for_mode(cell: supernet.SupernetCell, mode: str | None) -> supernet.SupernetCell:
  if mode is not None and cell.bn_axis_name is None:
    return dataclasses.replace(cell, bn_axis_name=parallel.AXIS)
  return cell


@dataclasses.dataclass
class Calibration:
  """A cell's recalibrated BatchNorm statistics for every node of its prefix tree (`calibrate_cell`).

  Computed once and reused for every rating batch. `lead`: the levels walked one op at a time;
  `stem`: block 1's stem and DS statistics; `nodes[prefix]`: the statistics of the prefix's last op
  (prefixes of 1..lead ops);
  `subtrees[prefix]` (prefixes of lead ops): per trailing level, per op, that op's statistics for each
  of the level's prefixes along a leading axis (path-major). A 5-layer 192-wide ImageNet cell has 9,330
  nodes of up to 20 KB (e6 ops): up to 190 MB, on every device, for as long as the cell is rated.
  """

  lead: int
  stem: Any
  nodes: dict[tuple[int, ...], Any]
  subtrees: dict[tuple[int, ...], tuple[Any, ...]]

  def node(self, cell: supernet.SupernetCell, path: tuple[int, ...]) -> Any:
    """The statistics of `path`'s last op, for any prefix of the tree."""
    if len(path) <= self.lead:
      return self.nodes[path]
    level = len(path) - 1
    per_op = self.subtrees[path[: self.lead]][level - self.lead]
    return _take(
      per_op[cell.cell.layer_ops(level).index(path[-1])], _suffix_index(cell, self.lead, path[self.lead : level])
    )


def calibrate_cell(
  cell: supernet.SupernetCell, variables: Any, calib: Array, chunk_size: int = 216, mode: str | None = None
) -> Calibration:
  """Every node's recalibrated statistics from the calibration inputs `calib` (the cell's input),
  walking the prefix tree as `rate_cell` does (`chunk_size` as there)."""
  cell = _for_mode(cell, mode)
  lead = cell.cell.layers - trailing_levels(cell.cell.layers, chunk_size)
  calibration = Calibration(lead, None, {}, {})
  if cell.stem is not None:
    calib, calibration.stem = compiled('calibrate_stem', cell, mode)(variables, calib)

  def walk(prefix: tuple[int, ...], calib: Array) -> None:
    level = len(prefix)
    if level == lead:
      calibration.subtrees[prefix] = compiled('calibrate_subtree', cell, mode, lead)(variables, calib)
      return
    for op_id in cell.cell.layer_ops(level):
      out, calibration.nodes[prefix + (op_id,)] = compiled('calibrate_op', cell, mode, level, op_id)(variables, calib)
      walk(prefix + (op_id,), out)

  walk((), calib)
  return calibration


def rate_cell(
  cell: supernet.SupernetCell,
  variables: Any,
  calibration: Calibration,
  inputs: Array,
  target: Array,
  mask: Array,
  mode: str | None = None,
  num_groups: int = 1,
  survivors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Per path and group, sums of |S - T| and (S - T)^2 over one rating batch: (num_paths, num_groups) each.

  `calibration`: the cell's `calibrate_cell`; `inputs`/`target`/`mask`: the rating batch (cell input,
  teacher output, 1 for real examples). Rows follow `cell.paths()` order. With `mode='shard_map'` the
  batches are sharded over all devices (the calibration made with the same mode). `survivors` (a boolean
  per path): only those paths are evaluated (the others' rows are 0); the prefix tree then holds only
  their prefixes, and a trailing subtree runs each op vmapped over just the nodes that need it, or whole
  when that would evaluate no fewer nodes (padding counted).
  """
  cell = _for_mode(cell, mode)
  layers_ = cell.cell.layers
  lead = calibration.lead
  widths = [len(cell.cell.layer_ops(l)) for l in range(lead, layers_)]
  subtree_paths = math.prod(widths)
  subtree_nodes = sum(math.prod(widths[: i + 1]) for i in range(len(widths)))
  paths = list(cell.cell.paths())
  abs_sums = np.zeros((len(paths), num_groups))
  sq_sums = np.zeros((len(paths), num_groups))
  if survivors is not None:
    kept = [paths[i] for i in np.flatnonzero(survivors)]
    under = collections.Counter(p[:i] for p in kept for i in range(layers_ + 1))
  if cell.stem is not None:
    inputs = compiled('apply_stem', cell, mode)(variables, calibration.stem, inputs)

  def store(prefix: tuple[int, ...], sums: tuple[Array, Array]) -> None:
    first = cell.cell.path_index(prefix + tuple(cell.cell.layer_ops(l)[0] for l in range(len(prefix), layers_)))
    a, s = (np.asarray(x, np.float64) for x in sums)
    abs_sums[first : first + len(a)] = a
    sq_sums[first : first + len(s)] = s

  def sparse_subtree(prefix: tuple[int, ...], inputs: Array, plan: SparsePlan) -> None:
    """The surviving nodes of `prefix`'s trailing subtree, level by level: each op vmapped over the
    parents that need it, gathered and padded to one of a few sizes (a level has at most
    subtree_paths / 6 parents: one call per op)."""
    acts = inputs[None]
    for l, (suffixes, uses) in zip(range(lead, layers_), plan):
      ops = cell.cell.layer_ops(l)
      outs = []
      for op_id, parents in uses:
        per_op = calibration.subtrees[prefix][l - lead][ops.index(op_id)]
        chunk = parents + [parents[0]] * (_padded_size(len(parents), subtree_paths) - len(parents))  # dropped below
        stats = _take(per_op, np.asarray([_suffix_index(cell, lead, suffixes[i]) for i in chunk]))
        x = _take(acts, np.asarray(chunk))
        if l < layers_ - 1:
          outs.append(compiled('prefixes', cell, mode, l, op_id)(variables, stats, x)[: len(parents)])
        else:
          sums = compiled('leaves', cell, mode, l, op_id, num_groups)(variables, stats, x, target, mask)
          a, q = (np.asarray(v, np.float64) for v in sums)
          for j, i in enumerate(parents):
            index = cell.cell.path_index(prefix + suffixes[i] + (op_id,))
            abs_sums[index], sq_sums[index] = a[j], q[j]
      if l < layers_ - 1:
        acts = jnp.concatenate(outs)  # the next level's parents, in the plan's order

  def walk(level: int, prefix: tuple[int, ...], inputs: Array) -> None:
    if level == lead:  # every path's last levels are in a trailing subtree (trailing_levels >= 1)
      if survivors is not None and not under[prefix]:
        return
      plan = None if survivors is None else _sparse_plan(cell, lead, prefix, under)
      if plan is None or _planned_nodes(plan, subtree_paths) >= subtree_nodes:
        stats = calibration.subtrees[prefix]
        store(prefix, compiled('subtree', cell, mode, lead, num_groups)(variables, stats, inputs, target, mask))
      else:
        sparse_subtree(prefix, inputs, plan)
      return
    for op_id in cell.cell.layer_ops(level):
      path = prefix + (op_id,)
      if survivors is None or under[path]:
        stats = calibration.node(cell, path)
        walk(level + 1, path, compiled('apply_op', cell, mode, level, op_id)(variables, stats, inputs))

  walk(0, (), inputs)
  return abs_sums, sq_sums


def naive_path_errors(
  cell: supernet.SupernetCell,
  variables: Any,
  path: tuple[int, ...],
  calib: Array,
  inputs: Array,
  target: Array,
  mask: Array,
) -> tuple[float, float]:
  """Reference: one path alone, layer after layer, recalibrated on `calib` (what `rate_cell` must equal)."""
  if cell.stem is not None:
    calib, inputs = stem_pair(cell, variables, calib, inputs)
  for l, op_id in enumerate(path):
    calib, inputs = _op_pair(cell, variables, l, op_id, calib, inputs)
  a, s = path_errors(inputs[None], target, mask)
  return float(a.sum()), float(s.sum())
