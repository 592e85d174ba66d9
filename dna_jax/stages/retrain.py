"""The retrain stage: the chosen child net trained from scratch (or from the supernet) with the trainer.

The recipe is config.retrain (a trainer section, see trainer.py; EfficientNet's by default). Reads
the architecture from `retrain.arch`: 'search' (WORKDIR/search/arch_1.json), a named net, an
architecture string or a JSON file. With `retrain.init_from_supernet` the child starts from the
distilled weights of its chosen paths (supernet_store.load_cells).

Writes WORKDIR/retrain/: checkpoints/ (resumed), best/ (weights of the best eval top-1, EMA or raw)
and final/ (final EMA weights), both child checkpoints (checkpoints.py), tb/ (TensorBoard) and
results.json ({arch, params, flops, macs, image_size, num_classes, steps, elapsed_seconds, final:
{step, epoch, ema: {top1, top5, loss, count}, raw: {...}}, best: {step, weights, top1, top5}};
accuracies are fractions).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from dna_jax import checkpoints
from dna_jax import costs
from dna_jax import files
from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import supernet_store
from dna_jax import trainer
from dna_jax import workdir as workdir_lib
from dna_jax.models import child


def resolve_architecture(name: str, workdir: str) -> space_lib.Architecture:
  """'search' (WORKDIR/search/arch_1.json), a named net, an architecture string or a JSON path."""
  if name == 'search':
    path = workdir_lib.Workdir(workdir).arch(1)
    if not path.exists():
      raise FileNotFoundError(
        f'retrain.arch=search but {path} does not exist: run stages=search first, or set '
        f'retrain.arch to one of {", ".join(space_lib.NAMED_ARCHITECTURES)} or a JSON path'
      )
    return space_lib.load_architecture(os.fspath(path))
  return space_lib.load_architecture(name)


def init_from_supernet(
  child_variables: Mapping[str, Any], arch: space_lib.Architecture, workdir: str, *, space: space_lib.SearchSpace
) -> dict[str, Any]:
  """Initialises the child from the distilled supernet's weights of its chosen cells and paths."""
  located = space_lib.locate(space, arch)
  if located is None:
    raise ValueError(f'init_from_supernet: architecture {arch} is not in the configured search space')
  cells = []
  for k, c in enumerate(located):
    try:
      block = supernet_store.load_cells(workdir, k)
    except FileNotFoundError as e:
      raise FileNotFoundError(
        f'init_from_supernet: {e}; run stages=distill in this workdir or set retrain.init_from_supernet=False'
      ) from None
    if c not in block:
      raise ValueError(f'init_from_supernet: the distilled block {k + 1} in {workdir} holds no cell {c}')
    cells.append(block[c])
  variables, copied, kept = child.transfer_supernet_weights(child_variables, arch, cells)
  logging.info('init_from_supernet: %d variables copied from the supernet, %d kept from random init.', copied, kept)
  return variables


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the chosen child net and writes best/, final/ and results.json."""
  rc = config.retrain
  arch = resolve_architecture(rc.arch, workdir)
  parallel.check_global_batch(rc.batch_size, 'retrain.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  image_size = config.data.image_size
  model = child.child_for_training(arch, num_classes, config, parallel.AXIS)
  paths = workdir_lib.Workdir(workdir)
  meta = checkpoints.child_meta(
    arch,
    num_classes,
    image_size,
    model.conventions,
    config.model.normalization,
    config.space.stem_stride,
    source='retrain',
  )
  cost, _ = costs.architecture_cost(arch, image_size, num_classes, config.space.stem_stride)
  logging.info(
    'Retraining %s: %.2fM params, %.1fM FLOPs at %d px.', arch, cost.params / 1e6, cost.flops / 1e6, image_size
  )

  def on_best(variables: dict[str, Any], best: dict[str, Any]) -> None:
    checkpoints.save_child(paths.retrain_best, variables, {**meta, **best})

  init_fn = None
  if rc.init_from_supernet:
    space = space_lib.space_from_config(config.space)
    init_fn = lambda variables: init_from_supernet(variables, arch, workdir, space=space)
  state, results = trainer.train_and_evaluate(
    model,
    rc,
    paths.retrain,
    trainer.dataset(config.data, rc),
    seed=config.seed,
    model_normalization=config.model.normalization,
    on_best=on_best,
    init_fn=init_fn,
  )
  final_meta = {**meta, 'weights': 'ema', 'step': results['steps']}
  checkpoints.save_child(paths.retrain_final, trainer.variables_of(state, ema=True), final_meta)
  results = {
    'arch': str(arch),
    'params': cost.params,
    'flops': cost.flops,
    'macs': cost.macs,
    'image_size': image_size,
    'num_classes': num_classes,
    **results,
  }
  if jax.process_index() == 0:
    files.write_json(paths.retrain_results, results)
  final = results['final'] or {}
  return {
    'arch': str(arch),
    'top1': final.get('ema', {}).get('top1'),
    'top5': final.get('ema', {}).get('top5'),
    'best_top1': (results['best'] or {}).get('top1'),
    'params': cost.params,
    'flops': cost.flops,
  }
