"""The end-of-run summary: what each stage produced, where to find it.

python -m dna_jax.summary WORKDIR
"""

from __future__ import annotations

from typing import Any

from absl import flags
from absl import logging
from etils import epath

from dna_jax import cli
from dna_jax import files
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax import workdir as workdir_lib


def _json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return files.read_json(path) if path.exists() else None
  except ValueError:
    return None


def _pct(value: Any) -> str:
  """An accuracy, stored as a fraction everywhere (stage markers and results files), in percent."""
  if not isinstance(value, (int, float)):
    return 'n/a'
  return f'{100 * value:.2f}%'


def summarize(workdir: str) -> str:
  """A plain-text report of the stages finished in `workdir` (also written to WORKDIR/summary.txt)."""
  paths = workdir_lib.Workdir(workdir)
  lines = [f'DNA run in {workdir}', '']
  teacher = _json(paths.stage_marker('teacher'))
  if teacher:
    lines.append(f'Teacher (trained here): test top-1 {_pct(teacher.get("top1"))}')
  ratings_dir = paths.ratings
  if (ratings_dir / ratings_lib.META).exists():
    try:
      table = ratings_lib.read_ratings(str(ratings_dir))
    except ValueError as e:
      table = None
      lines.append(f'Ratings unreadable: {e}')
    if table is not None:
      lines.append('Best path of every block (relative L1 to the teacher, lower is better):')
      for k, block in enumerate(table.blocks):
        best = int(block.score.argmin())
        cell = table.space.blocks[k].cells[int(block.cell[best])]
        ops = space_lib.ops_string(block.ops[best])
        lines.append(
          f'  block {k + 1}: cell {cell.name:>6}  {ops:<30} score {block.score[best]:.4f}  '
          f'({table.space.blocks[k].num_paths} paths rated)'
        )
  best = _json(paths.arch(1))
  if best:
    lines.append('')
    lines.append(f'Chosen architecture: {best.get("string")}')
    lines.append(
      f'  summed score {best.get("score", float("nan")):.4f}, {best.get("flops", 0) / 1e6:.2f} MFLOPs, '
      f'{best.get("params", 0):,} params'
    )
  results = _json(paths.retrain_results)
  if results:
    final = (results.get('final') or {}).get('ema') or {}
    lines.append(
      f'  retrained: test top-1 {_pct(final.get("top1"))} (EMA weights), '
      f'best {_pct((results.get("best") or {}).get("top1"))}'
    )
  fidelity = _json(paths.fidelity / 'fidelity.json')
  if fidelity:
    tau = fidelity.get('kendall_tau', {})
    lines.append(
      f'Ranking fidelity: Kendall tau {tau.get("value", float("nan")):.3f} '
      f'(95% CI {tau.get("low", float("nan")):.3f}..{tau.get("high", float("nan")):.3f})'
    )
  lines.append('')
  lines.append('Outputs:')
  for label, path in (
    ('ratings CSVs', ratings_dir),
    ('Pareto plot', paths.search / 'pareto.png'),
    ('architecture JSON', paths.arch(1)),
    ('distillation loss curves', paths.loss_curves),
    ('TensorBoard logs', paths.root),
    ('fidelity report', paths.fidelity / 'fidelity.json'),
  ):
    if path.exists():
      lines.append(f'  {label:<25} {path}')
  text = '\n'.join(lines)
  try:
    files.atomic_write_text(paths.summary, text + '\n')
  except OSError as e:  # a read-only workdir still gets its summary printed
    logging.warning('could not write %s: %s', paths.summary, e)
  return text


FLAGS = flags.FlagValues()


def main(argv: list[str]) -> None:
  if len(argv) != 1:
    raise ValueError('usage: python -m dna_jax.summary WORKDIR')
  print(summarize(argv[0]))


if __name__ == '__main__':
  cli.run(main, FLAGS)
