"""The workdir layout: every path a stage reads or writes, in one table.

  config.json               the run's identity and config (stages/__init__.py)
  stages/NAME.done          a finished stage
  summary.txt               the end-of-run summary
  teacher/                  the demo teacher (teacher checkpoint format, teacher.py)
  teacher_training/         its training checkpoints and TensorBoard logs
  distill/block_K/          one Orbax manager per block (supernet_store.py)
  distill/tb/, history.json, loss_curves.png
  ratings/                  meta.json + block_K.csv (ratings.py)
  search/arch_K.json, pareto.png
  retrain/checkpoints/, best/, final/, tb/, results.json, evaluation.json
  fidelity/picked.json, runs/I_seedS/, fidelity.{csv,json,png}, tb/
  versus_random/picked.json, runs/I_seedS/, runs.csv, summary.json, versus_random.png, tb/
  export/model.tflite, export/saved_model/

Block numbers in names are 1-based; the functions take 0-based block indices. Works for gs:// too.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath


def _path(directory: str | os.PathLike[str]) -> epath.Path:
  """An epath; local paths made absolute (Orbax needs them so), gs:// and other URLs unchanged."""
  text = os.fspath(directory)
  if not text:
    raise ValueError('empty directory name')
  return epath.Path(text if '://' in text else os.path.abspath(text))


def as_path(directory: str | os.PathLike[str]) -> epath.Path:
  """Any directory (workdir or checkpoint) as an absolute epath."""
  return _path(directory)


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths inside one run directory."""

  root: epath.Path

  def __init__(self, root: str | os.PathLike[str]):
    object.__setattr__(self, 'root', _path(root))

  def __str__(self) -> str:
    return os.fspath(self.root)

  # pipeline
  @property
  def config_json(self) -> epath.Path:
    return self.root / 'config.json'

  def stage_marker(self, stage: str) -> epath.Path:
    return self.root / 'stages' / f'{stage}.done'

  @property
  def summary(self) -> epath.Path:
    return self.root / 'summary.txt'

  # teacher stage
  @property
  def teacher(self) -> epath.Path:
    return self.root / 'teacher'

  @property
  def teacher_training(self) -> epath.Path:
    return self.root / 'teacher_training'

  # distill stage
  @property
  def distill(self) -> epath.Path:
    return self.root / 'distill'

  def distill_block(self, block_index: int) -> epath.Path:
    return self.distill / f'block_{block_index + 1}'

  @property
  def distill_history(self) -> epath.Path:
    return self.distill / 'history.json'

  @property
  def loss_curves(self) -> epath.Path:
    return self.distill / 'loss_curves.png'

  # rate and search stages
  @property
  def ratings(self) -> epath.Path:
    return self.root / 'ratings'

  @property
  def search(self) -> epath.Path:
    return self.root / 'search'

  def arch(self, rank: int = 1) -> epath.Path:
    """The search's rank-th architecture (1 = the chosen net)."""
    return self.search / f'arch_{rank}.json'

  # retrain and evaluate stages
  @property
  def retrain(self) -> epath.Path:
    return self.root / 'retrain'

  @property
  def retrain_final(self) -> epath.Path:
    return self.retrain / 'final'

  @property
  def retrain_best(self) -> epath.Path:
    return self.retrain / 'best'

  @property
  def retrain_results(self) -> epath.Path:
    return self.retrain / 'results.json'

  @property
  def evaluation(self) -> epath.Path:
    return self.retrain / 'evaluation.json'

  # studies
  @property
  def fidelity(self) -> epath.Path:
    return self.root / 'fidelity'

  @property
  def versus_random(self) -> epath.Path:
    return self.root / 'versus_random'

  # export stage
  def export(self, format: str) -> epath.Path:
    return self.root / 'export' / ('model.tflite' if format == 'tflite' else 'saved_model')


def study_run(study: epath.Path, index: int, seed: int) -> epath.Path:
  """One training run of a study (fidelity, versus_random): runs/INDEX_seedSEED."""
  return study / 'runs' / f'{index}_seed{seed}'
