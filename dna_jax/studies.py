"""Training runs of a ranking study (fidelity, versus_random): one net, one seed, one directory.

A study trains many nets from scratch with the retrain recipe (`recipe`), each in
STUDY/runs/INDEX_seedSEED: arch.json (written first), the trainer's Orbax checkpoints (a killed run
resumes) and result.json once it finished, which a rerun reads instead of training again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from dna_jax import files
from dna_jax import input_pipeline
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax import trainer
from dna_jax import workdir as workdir_lib
from dna_jax.models import child


def recipe(config: ml_collections.ConfigDict, epochs: float) -> ml_collections.ConfigDict:
  """config.retrain shortened to `epochs` (when > 0 and shorter), with a single evaluation, at the end.

  A shortened run keeps the schedule's shape: its learning-rate warm-up shrinks by the same factor, and
  the weights' EMA warms up (decay min(ema_decay, (1 + t) / (10 + t))) instead of starting at a constant
  decay. Measured on the demo's 58-step study runs (a sixth of its retrain recipe): with the warm-up left
  at 0.3 epochs the whole run was warm-up, and a constant 0.999 decay kept 94% of the initial weights in
  the EMA; one net's two seeds scored 65.5% and 29.5%, and the study ranked noise.
  """
  tc = config.retrain.copy_and_resolve_references()
  if 0 < epochs < tc.epochs:
    tc.warmup_epochs *= epochs / tc.epochs
    tc.ema_warmup = True
  if epochs > 0:
    tc.epochs = epochs
  tc.eval_every_epochs = tc.epochs
  return tc


def train_architecture(
  config: ml_collections.ConfigDict, arch: space_lib.Architecture, directory: str, seed: int, epochs: float
) -> dict[str, Any]:
  """Trains `arch` from scratch with `recipe(config, epochs)` in `directory` (resumed); eval-split results.

  `accuracy` is the final test top-1 (a fraction) of the EMA weights, as the retrain stage reports it.
  """
  tc = recipe(config, epochs)
  num_classes = input_pipeline.check_dataset(config.data)
  model = child.child_for_training(arch, num_classes, config, parallel.AXIS)
  data = trainer.dataset(config.data, tc)
  _, results = trainer.train_and_evaluate(
    model, tc, directory, data, seed=seed, model_normalization=config.model.normalization
  )
  final = results['final']
  return {
    'accuracy': final['ema']['top1'],
    'top5': final['ema']['top5'],
    'raw_accuracy': final['raw']['top1'],
    'steps': results['steps'],
    'elapsed_seconds': results['elapsed_seconds'],
  }


WEIGHTS = {'ema': 'accuracy', 'raw': 'raw_accuracy'}


def check_weights(weights: str, key: str) -> None:
  if weights not in WEIGHTS:
    raise ValueError(f'{key} must be one of {sorted(WEIGHTS)}, got {weights!r}')


def accuracy(result: dict[str, Any], weights: str) -> float:
  """A run's test top-1 with its EMA ('ema') or its final ('raw') weights."""
  return float(result[WEIGHTS[weights]])


def train_once(
  config: ml_collections.ConfigDict, study: epath.Path, index: int, arch: str, seed: int, epochs: float
) -> dict[str, Any]:
  """One run's result: read from its result.json if it finished, else trained (resuming) and written there.

  arch.json and result.json record the architecture and the training recipe; a run directory made with
  another of either (or by a version that recorded no recipe) is refused, never mixed into the study.
  """
  directory = workdir_lib.study_run(study, index, seed)
  result_path, arch_path = directory / 'result.json', directory / 'arch.json'
  run_recipe = json.loads(json.dumps(recipe(config, epochs).to_dict()))
  for path in (result_path, arch_path):
    if not path.exists():
      continue
    saved = json.loads(path.read_text())
    if saved['arch'] != arch:
      raise ValueError(
        f'{path} belongs to another architecture than {arch} (picked.json was replaced?); '
        f'delete {directory} to train it again'
      )
    if 'recipe' not in saved:
      why = 'records no recipe (an older dna_jax, before shortened runs scaled their warm-up and EMA)'
    elif saved['recipe'] != run_recipe:
      changed = sorted(k for k in {*run_recipe, *saved['recipe']} if saved['recipe'].get(k) != run_recipe.get(k))
      why = f'was trained with another recipe (retrain.{", retrain.".join(changed)} differ)'
    else:
      continue
    raise ValueError(f'{path} {why}; delete {directory} to train it again with this config')
  if result_path.exists():
    logging.info('Run %s finished before: %s.', directory.name, result_path)
    return json.loads(result_path.read_text())
  if not arch_path.exists() and jax.process_index() == 0:
    files.write_json(arch_path, {'arch': arch, 'seed': seed, 'recipe': run_recipe})
  logging.info('Study run %s/%s: %s.', study.name, directory.name, arch)
  result = {
    'index': index,
    'arch': arch,
    'seed': seed,
    'recipe': run_recipe,
    **train_architecture(config, space_lib.from_string(arch), os.fspath(directory), seed, epochs),
  }
  if jax.process_index() == 0:
    files.write_json(result_path, result)
  return result
