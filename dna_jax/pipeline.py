"""Runs the configured stages in order, records each one's completion, resumes on rerun."""

from __future__ import annotations

from collections.abc import Callable
import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from dna_jax import config_base
from dna_jax import files
from dna_jax import space as space_lib

# Fields that define what a workdir holds: a rerun with other values would mix results.
IDENTITY_KEYS = ('space', 'teacher.variant', 'teacher.checkpoint', 'data.dataset', 'data.image_size', 'model')


def _stage_runner(name: str) -> Callable[[ml_collections.ConfigDict, str], Any]:
  # Imported on use: a search-only run should not build the training stack.
  if name == 'teacher':
    from dna_jax import train_teacher

    return train_teacher.run
  if name == 'distill':
    from dna_jax import distill

    return distill.run
  if name == 'rate':
    from dna_jax import rate

    return rate.run
  if name == 'search':
    from dna_jax import search

    return search.run
  if name in ('retrain', 'evaluate'):
    from dna_jax import retrain

    return retrain.run if name == 'retrain' else retrain.evaluate
  if name == 'fidelity':
    from dna_jax import fidelity

    return fidelity.run
  raise ValueError(f'unknown stage {name!r}; valid: {", ".join(config_base.STAGES)}')


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for key in dotted.split('.'):
    value = value[key]
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the identity of a new workdir; refuses a workdir made by a different experiment."""
  path = epath.Path(workdir) / 'config.json'
  identity = {key: _lookup(config, key) for key in IDENTITY_KEYS}
  if path.exists():
    saved = json.loads(path.read_text())
    differing = [k for k in IDENTITY_KEYS if k in saved.get('identity', {}) and saved['identity'][k] != identity[k]]
    if differing:
      details = '; '.join(f'{k}: workdir has {saved["identity"][k]!r}, config has {identity[k]!r}' for k in differing)
      raise ValueError(
        f'workdir {workdir} was made by a different experiment ({details}). '
        'Use a new --workdir, or restore those config values to resume.'
      )
    return
  if jax.process_index() == 0:
    files.atomic_write_text(
      path, json.dumps({'identity': identity, 'config': json.loads(config.to_json_best_effort())}, indent=1)
    )


def stage_marker(workdir: str, stage: str) -> epath.Path:
  return epath.Path(workdir) / 'stages' / f'{stage}.done'


def mark_done(workdir: str, stage: str, info: dict[str, Any] | None = None) -> None:
  if jax.process_index() == 0:
    marker = stage_marker(workdir, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({'finished': time.strftime('%Y-%m-%d %H:%M:%S'), **(info or {})}))


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Start-up checks that need no data or devices; returns the stage list."""
  stages = config_base.parse_stages(config.stages)
  space_lib.space_from_config(config.space)
  return stages


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs every configured stage not yet finished in `workdir`."""
  stages = validate(config)
  check_workdir(config, workdir)
  for stage in stages:
    if stage_marker(workdir, stage).exists():
      logging.info(
        'Stage %s already finished in %s (delete %s to run it again).', stage, workdir, stage_marker(workdir, stage)
      )
      continue
    logging.info('Stage %s starts.', stage)
    start = time.time()
    result = _stage_runner(stage)(config, workdir)
    mark_done(
      workdir, stage, {'seconds': round(time.time() - start, 1), **(result if isinstance(result, dict) else {})}
    )
    logging.info('Stage %s finished in %.1f s.', stage, time.time() - start)
  print_summary(workdir)


def print_summary(workdir: str) -> None:
  if jax.process_index() == 0:
    from dna_jax import summary

    print(summary.summarize(workdir))
