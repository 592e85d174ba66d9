"""The stages and the runner: `run(config, workdir)` runs `config.stages` in pipeline order.

Each stage is a module of this package with `run(config, workdir) -> dict` that reads the files of
the stages before it and writes its own (see workdir.py). The runner records each finished stage in
WORKDIR/stages/NAME.done (with the dict the stage returned), skips finished stages on a rerun, and
refuses a workdir made by a different experiment (space, teacher, data or model conventions).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from dna_jax import files
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib

STAGES = ('teacher', 'distill', 'rate', 'search', 'retrain', 'evaluate', 'export', 'fidelity', 'versus_random')

# Fields that define what a workdir holds: a rerun with other values would mix results.
IDENTITY_KEYS = ('space', 'teacher.variant', 'teacher.checkpoint', 'data.dataset', 'data.image_size', 'model')


def stage_runner(name: str) -> Callable[[ml_collections.ConfigDict, str], dict[str, Any]]:
  """The `run` function of a stage; imported on use (a search-only run never builds the training stack)."""
  if name == 'teacher':
    from dna_jax.stages import teacher as stage
  elif name == 'distill':
    from dna_jax.stages import distill as stage
  elif name == 'rate':
    from dna_jax.stages import rate as stage
  elif name == 'search':
    from dna_jax.stages import search as stage
  elif name == 'retrain':
    from dna_jax.stages import retrain as stage
  elif name == 'evaluate':
    from dna_jax.stages import evaluate as stage
  elif name == 'export':
    from dna_jax.stages import export as stage
  elif name == 'fidelity':
    from dna_jax.stages import fidelity as stage
  elif name == 'versus_random':
    from dna_jax.stages import versus_random as stage
  else:
    raise ValueError(f'unknown stage {name!r}; valid: {", ".join(STAGES)}')
  return stage.run


def parse_stages(text: str) -> list[str]:
  """Validated stage list in pipeline order."""
  names = [s.strip() for s in text.split(',') if s.strip()]
  if not names:
    raise ValueError(f'config.stages is empty; choose from {", ".join(STAGES)}')
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f'unknown stage(s) {", ".join(unknown)} in config.stages; valid: {", ".join(STAGES)}')
  return [s for s in STAGES if s in names]


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """config['a']['b'] for 'a.b'; sections as plain dicts."""
  value = config
  for key in dotted.split('.'):
    value = value[key]
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the identity of a new workdir; refuses a workdir made by a different experiment."""
  path = workdir_lib.Workdir(workdir).config_json
  identity = {key: lookup(config, key) for key in IDENTITY_KEYS}
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
    files.write_json(path, {'identity': identity, 'config': json.loads(config.to_json_best_effort())})


def mark_done(workdir: str, stage: str, info: dict[str, Any] | None = None) -> None:
  if jax.process_index() == 0:
    record = {'finished': time.strftime('%Y-%m-%d %H:%M:%S'), **(info or {})}
    files.write_json(workdir_lib.Workdir(workdir).stage_marker(stage), record)


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Start-up checks that need no data or devices; returns the stage list."""
  stages = parse_stages(config.stages)
  space_lib.space_from_config(config.space)
  return stages


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs every configured stage not yet finished in `workdir`, then prints the summary."""
  stages = validate(config)
  check_workdir(config, workdir)
  paths = workdir_lib.Workdir(workdir)
  for stage in stages:
    if paths.stage_marker(stage).exists():
      logging.info(
        'Stage %s already finished in %s (delete %s to run it again).', stage, workdir, paths.stage_marker(stage)
      )
      continue
    logging.info('Stage %s starts.', stage)
    start = time.time()
    result = stage_runner(stage)(config, workdir)
    mark_done(workdir, stage, {'seconds': round(time.time() - start, 1), **(result or {})})
    logging.info('Stage %s finished in %.1f s.', stage, time.time() - start)
  if jax.process_index() == 0:
    from dna_jax import summary

    print(summary.summarize(workdir))
