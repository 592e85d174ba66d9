"""The rate stage: every path of every cell of the chosen blocks, rated against the teacher.

The teacher runs once per rating batch for all cells; each cell is recalibrated once and its paths
rated as a prefix tree (cell_rating.py). Per path: relative L1 (mean |S - T| / std(T)) and MSE on
the held-out rating split, written to WORKDIR/ratings/block_K.csv. Adaptive rating (path_pruning.py)
stops the paths that cannot be in the search's answers.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
import dataclasses
import functools
import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dna_jax import cell_rating
from dna_jax import images as images_lib
from dna_jax import input_pipeline
from dna_jax import latency_table
from dna_jax import parallel
from dna_jax import path_pruning
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import teacher as teacher_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models import layers
from dna_jax.models import supernet

Array = jax.Array


@dataclasses.dataclass
class Accumulator:
  """Running sums for one block: per path and group of images, the error sums; per path, the target
  elements and images those sums hold (fewer for a path that adaptive rating stopped); the teacher's
  moments over the whole split and its elements per group."""

  abs_sums: dict[int, np.ndarray]  # (paths, groups)
  sq_sums: dict[int, np.ndarray]
  elements: dict[int, np.ndarray]  # (paths,)
  images: dict[int, np.ndarray]  # (paths,)
  group_elements: np.ndarray  # (groups,)
  target_sum: float = 0.0
  target_sq_sum: float = 0.0
  count: float = 0.0  # target elements seen

  @classmethod
  def empty(cls, paths_per_cell: list[int], num_groups: int) -> Accumulator:
    zeros = lambda shape: {c: np.zeros(shape(n)) for c, n in enumerate(paths_per_cell)}
    return cls(
      zeros(lambda n: (n, num_groups)),
      zeros(lambda n: (n, num_groups)),
      zeros(lambda n: n),
      zeros(lambda n: n),
      np.zeros(num_groups),
    )

  def add_target(self, total: float, total_sq: float, group_elements: np.ndarray) -> None:
    self.target_sum += total
    self.target_sq_sum += total_sq
    self.group_elements = self.group_elements + group_elements
    self.count += float(np.sum(group_elements))

  def add(
    self, c: int, abs_sums: np.ndarray, sq_sums: np.ndarray, rated: np.ndarray | None, elements: float, images: float
  ) -> None:
    """One batch's sums of cell c; `rated`: the paths the batch was rated on (None: all)."""
    self.abs_sums[c] = self.abs_sums[c] + abs_sums
    self.sq_sums[c] = self.sq_sums[c] + sq_sums
    weight = 1.0 if rated is None else rated.astype(np.float64)
    self.elements[c] = self.elements[c] + weight * elements
    self.images[c] = self.images[c] + weight * images

  def group_errors(self, c: int) -> np.ndarray:
    """Mean |S - T| per path and group of images so far (paths, groups)."""
    return self.abs_sums[c] / np.maximum(self.group_elements, 1.0)

  def scores(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    mean = self.target_sum / self.count
    std = math.sqrt(max(self.target_sq_sum / self.count - mean * mean, 0.0)) + 1e-12
    score = {c: (a.sum(-1) / self.elements[c]) / std for c, a in self.abs_sums.items()}
    mse = {c: s.sum(-1) / self.elements[c] for c, s in self.sq_sums.items()}
    return score, mse


@functools.partial(jax.jit, static_argnums=2)
def target_moments(target: Array, mask: Array, num_groups: int = 1) -> tuple[Array, Array, Array]:
  """Sum and sum of squares of the teacher feature elements of the real examples, and their count per
  group of examples (cell_rating.path_errors' groups). Global arrays: over every device of every process, so
  that every host divides by the same count."""
  t = target.astype(jnp.float32).reshape(target.shape[0], -1)
  real = (mask > 0)[:, None]
  t = jnp.where(real, t, 0.0)
  per_group = (real[:, 0].astype(jnp.float32) * t.shape[1]) @ cell_rating.group_onehot(t.shape[0], num_groups)
  return jnp.sum(t), jnp.sum(jnp.square(t)), per_group


TEACHER_RATING_BN = ('running', 'batch', 'recalibrated')


def teacher_for_rating(
  teacher_model: Any, teacher_variables: Any, calib_images: Array, up_to: int, rating_bn: str
) -> tuple[Callable[..., dict[str, Array]], Any]:
  """(features(variables, images, mask), variables) of the teacher as `teacher.rating_bn` runs it.

  'running': inference mode with the teacher's own statistics; 'batch': BatchNorm over each rating
  batch (padding excluded); 'recalibrated' (the authors'): statistics recomputed on the calibration
  batch, then inference mode.
  """
  if rating_bn not in TEACHER_RATING_BN:
    raise ValueError(f'teacher.rating_bn={rating_bn!r}; valid: {", ".join(TEACHER_RATING_BN)}')
  if rating_bn == 'recalibrated':
    recalibrate = jax.jit(functools.partial(teacher_lib.recalibrated, teacher_model, up_to=up_to))
    teacher_variables = recalibrate(teacher_variables, calib_images)
  features = jax.jit(
    functools.partial(teacher_lib.teacher_features, teacher_model, up_to=up_to, train_mode_bn=rating_bn == 'batch')
  )
  return features, teacher_variables


def rate_blocks(
  config: ml_collections.ConfigDict,
  teacher_model: Any,
  teacher_variables: Any,
  cells: list[list[supernet.SupernetCell]],
  variables: dict[int, list[Any]],
  calib_batch: dict[str, np.ndarray],
  batches: Iterable[dict[str, np.ndarray]],
  num_batches: int | None,
  mode: str | None,
  path_costs: dict[int, list[np.ndarray]] | None = None,
) -> dict[int, Accumulator]:
  """Accumulates every path of every cell of the given blocks over the rating batches.

  Every cell is recalibrated once, before the first batch (cell_rating.calibrate_cell); all the cells'
  statistics stay on the devices while the teacher's features of each batch feed every cell.

  With `path_costs` (per block and cell, path_pruning.block_path_costs) the rating is adaptive: once
  `config.rate.adaptive_examples` images are rated, each block's dominated paths stop (path_pruning).
  """
  block_ids = sorted(variables)
  num_groups = config.rate.groups if path_costs is not None else 1
  survivors: dict[int, list[np.ndarray | None]] = {k: [None] * len(cells[k]) for k in block_ids}
  pruned = path_costs is None
  seen = 0.0
  prepare = (
    (lambda x: jnp.asarray(np.reshape(x, (-1,) + x.shape[2:])))
    if mode is None
    else (lambda x: parallel.shard_batch({'x': x}, 'shard_map')['x'])
  )
  calib_images = prepare(calib_batch['image'])
  t_apply, teacher_variables = teacher_for_rating(
    teacher_model, teacher_variables, calib_images, max(block_ids) + 1, config.teacher.rating_bn
  )
  calib_features = t_apply(teacher_variables, calib_images)
  to_student = supernet_store.student_normalization(config)
  student = (
    (lambda x: x) if to_student is None else (lambda x: images_lib.normalize(x.astype(jnp.float32), *to_student))
  )
  calib_student = student(calib_images)
  chunk = config.rate.chunk_size
  acc = {k: Accumulator.empty([cell.cell.num_paths for cell in cells[k]], num_groups) for k in block_ids}
  rating_cells = {k: [cell_rating.for_rating(cell, None) for cell in cells[k]] for k in block_ids}
  start = time.time()
  calibrations = {
    k: [
      cell_rating.calibrate_cell(
        cell, variables[k][c], calib_student if k == 0 else calib_features[f'block{k}'], chunk, mode
      )
      for c, cell in enumerate(rating_cells[k])
    ]
    for k in block_ids
  }
  logging.info('BatchNorm statistics of every path recalibrated in %.1f s', time.time() - start)
  start = time.time()
  for done, batch in enumerate(batches, start=1):
    images, mask = prepare(batch['image']), prepare(batch['mask'])
    features = t_apply(teacher_variables, images, mask=mask)
    for k in block_ids:
      target = features[f'block{k + 1}']
      inputs = student(images) if k == 0 else features[f'block{k}']
      total, total_sq, per_group = target_moments(target, mask, num_groups)
      per_group = np.asarray(per_group, np.float64)
      acc[k].add_target(float(total), float(total_sq), per_group)
      elements = float(per_group.sum())
      real = elements / math.prod(target.shape[1:])
      for c, cell in enumerate(rating_cells[k]):
        a, s = cell_rating.rate_cell(
          cell, variables[k][c], calibrations[k][c], inputs, target, mask, mode, num_groups, survivors[k][c]
        )
        acc[k].add(c, a, s, survivors[k][c], elements, real)
    seen += real
    if not pruned and seen >= config.rate.adaptive_examples and done != num_batches:
      pruned = True
      for k in block_ids:
        survivors[k] = prune_block(config, acc[k], path_costs[k], [cell.cell.width for cell in cells[k]])
        kept = sum(int(x.sum()) for x in survivors[k])
        total_paths = sum(len(x) for x in survivors[k])
        logging.info(
          'adaptive rating, block %d: %d of %d paths can still be in the top %d after %d images; '
          'only those are rated on the rest',
          k + 1,
          kept,
          total_paths,
          config.rate.keep,
          int(seen),
        )
    elapsed = time.time() - start
    eta = f', ETA {elapsed / done * (num_batches - done):.0f} s' if num_batches else ''
    logging.info('rating batch %d%s done in %.1f s%s', done, f'/{num_batches}' if num_batches else '', elapsed, eta)
  return acc


def prune_block(
  config: ml_collections.ConfigDict, acc: Accumulator, cell_costs: list[np.ndarray], widths: list[int]
) -> list[np.ndarray]:
  """The paths of one block still worth rating (path_pruning.prune_block on the groups' errors so far)."""
  errors = [acc.group_errors(c) for c in range(len(cell_costs))]
  return path_pruning.prune_block(cell_costs, errors, widths, config.rate.keep, config.rate.clear_z)


def check_adaptive(rate_config: ml_collections.ConfigDict, top_k: int) -> None:
  """Clear errors for adaptive-rating settings that cannot work (before anything is loaded)."""
  if rate_config.groups < 2:
    raise ValueError(f'rate.groups={rate_config.groups}: adaptive rating needs at least 2 groups of images')
  if rate_config.adaptive_examples < 1:
    raise ValueError(f'rate.adaptive_examples={rate_config.adaptive_examples}: expected a positive number of images')
  if rate_config.keep < max(1, top_k):
    raise ValueError(
      f'rate.keep={rate_config.keep} is below search.top_k={top_k}: adaptive rating would drop paths of the '
      'nets the search must return; raise rate.keep or set rate.adaptive=False'
    )


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
  adaptive = bool(config.rate.adaptive)
  if adaptive:
    check_adaptive(config.rate, config.search.top_k)
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
  calib_batch = next(input_pipeline.create_split(config.data, 'calib', config.rate.calib_batch_size))
  examples = input_pipeline.num_examples(config.data, 'rate')
  num_batches = -(-examples // config.rate.batch_size) if examples else None
  batches = input_pipeline.create_split(config.data, 'rate', config.rate.batch_size)
  start = time.time()
  path_costs, pruned_costs = None, ()
  if adaptive:
    latency = None
    pruned_costs = ('flops', 'params')
    if config.search.latency_table:  # prune on predicted latency too, so that latency budgets stay exact
      latency = latency_table.read(config.search.latency_table)
      latency_table.check_covers(latency, space, config.data.image_size, num_classes, config.space.stem_stride)
      pruned_costs += (f'latency:{config.search.latency_table}',)
    path_costs = {
      k: path_pruning.block_path_costs(space, k, config.data.image_size, config.space.stem_stride, latency)
      for k in block_ids
    }
  acc = rate_blocks(
    config, teacher_model, teacher_variables, cells, variables, calib_batch, batches, num_batches, mode, path_costs
  )
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
        images=acc[k].images,
        pruned_for_top_k=config.rate.keep if adaptive else 0,
        pruned_costs=pruned_costs,
      )
    paths += sum(len(s) for s in score.values())
  logging.info('Rated %d paths in %.1f s (%.1f paths/s).', paths, seconds, paths / seconds)
  return {'paths': paths, 'seconds': round(seconds, 1)}
