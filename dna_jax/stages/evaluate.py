"""The evaluate stage: top-1/top-5 of child checkpoints on the eval split.

Evaluates `retrain.checkpoint` (any child checkpoint, e.g. from dna_jax.convert_authors) or else
WORKDIR/retrain/final and best; writes WORKDIR/retrain/evaluation.json.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import ml_collections

from dna_jax import checkpoints
from dna_jax import files
from dna_jax import images as images_lib
from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import trainer
from dna_jax import workdir as workdir_lib
from dna_jax.models import layers


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Top-1/top-5 of retrain.checkpoint, or of WORKDIR/retrain/{final,best}."""
  rc = config.retrain
  paths = workdir_lib.Workdir(workdir)
  if rc.checkpoint:
    directories = {'checkpoint': rc.checkpoint}
  else:
    candidates = {'final': paths.retrain_final, 'best': paths.retrain_best}
    directories = {name: os.fspath(path) for name, path in candidates.items() if checkpoints.is_child(path)}
  if not directories:
    raise FileNotFoundError(
      f'nothing to evaluate: no {paths.retrain_final} or {paths.retrain_best} (run stages=retrain) '
      'and retrain.checkpoint is empty'
    )
  parallel.check_global_batch(rc.batch_size, 'retrain.batch_size')
  num_classes = input_pipeline.check_dataset(config.data)
  source = images_lib.check_normalization(config.data.normalization, 'data.normalization')
  dtype = layers.conventions_from_config(config.model).dtype
  results = {}
  for name, directory in directories.items():
    model, variables, meta = checkpoints.load_child(directory, dtype=dtype, depthwise=config.model.depthwise)
    if meta['num_classes'] != num_classes:
      raise ValueError(
        f'{directory} predicts {meta["num_classes"]} classes but {config.data.dataset} has {num_classes}'
      )
    target = meta['normalization']
    eval_fn = trainer.parallel_eval(rc.parallel, model.apply, None if source == target else (source, target))
    batches = input_pipeline.create_split(config.data, 'eval', rc.batch_size)
    sums = trainer.evaluate_batches(eval_fn, parallel.replicate(variables, rc.parallel), batches, rc.parallel)
    results[name] = {'directory': directory, 'arch': meta['arch'], **sums}
    logging.info(
      'Evaluated %s (%s): top-1 %.2f%% top-5 %.2f%% on %d images.',
      name,
      directory,
      100 * sums['top1'],
      100 * sums['top5'],
      sums['count'],
    )
  if jax.process_index() == 0:
    files.write_json(paths.evaluation, results)
  return {f'{name}_{k}': r[k] for name, r in results.items() for k in ('top1', 'top5')}
