"""The end-of-run summary: what each stage produced, where to find it.

python -m dna_jax.summary WORKDIR
"""

from __future__ import annotations

import json
import sys
from typing import Any

from etils import epath

from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib


def _json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (OSError, ValueError):
    return None


def _pct(value: Any) -> str:
  """Accuracies are stored in percent (stage markers) or as fractions (results files)."""
  if not isinstance(value, (int, float)):
    return 'n/a'
  return f'{value if value > 1 else 100 * value:.2f}%'


def summarize(workdir: str) -> str:
  """A plain-text report of the stages finished in `workdir` (also written to WORKDIR/summary.txt)."""
  root = epath.Path(workdir)
  lines = [f'DNA run in {workdir}', '']
  teacher = _json(root / 'stages' / 'teacher.done')
  if teacher:
    lines.append(f'Teacher (trained here): test top-1 {_pct(teacher.get("top1"))}')
  ratings_dir = root / 'ratings'
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
  search_dir = root / 'search'
  best = _json(search_dir / 'arch_1.json')
  if best:
    lines.append('')
    lines.append(f'Chosen architecture: {best.get("string")}')
    lines.append(
      f'  summed score {best.get("score", float("nan")):.4f}, {best.get("flops", 0) / 1e6:.2f} MFLOPs, '
      f'{best.get("params", 0):,} params'
    )
  results = _json(root / 'retrain' / 'results.json')
  if results:
    final = (results.get('final') or {}).get('ema') or {}
    lines.append(
      f'  retrained: test top-1 {_pct(final.get("top1"))} (EMA weights), '
      f'best {_pct((results.get("best") or {}).get("top1"))}'
    )
  fidelity = _json(root / 'fidelity' / 'fidelity.json')
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
    ('Pareto plot', search_dir / 'pareto.png'),
    ('architecture JSON', search_dir / 'arch_1.json'),
    ('distillation loss curves', root / 'distill' / 'loss_curves.png'),
    ('TensorBoard logs', root),
    ('fidelity report', root / 'fidelity' / 'fidelity.json'),
  ):
    if path.exists():
      lines.append(f'  {label:<25} {path}')
  text = '\n'.join(lines)
  try:
    (root / 'summary.txt').write_text(text + '\n')
  except OSError:
    pass
  return text


if __name__ == '__main__':
  if len(sys.argv) != 2:
    print('usage: python -m dna_jax.summary WORKDIR', file=sys.stderr)
    sys.exit(2)
  print(summarize(sys.argv[1]))
