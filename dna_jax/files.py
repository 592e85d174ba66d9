"""Small file helpers shared by the stages (local paths and gs:// alike, through etils.epath)."""

from __future__ import annotations

import os

from etils import epath


def atomic_write_text(path: str | os.PathLike[str], text: str) -> epath.Path:
  """Writes `text` to `path` through a temporary file and a rename: readers never see a partial file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp-{os.getpid()}'
  tmp.write_text(text)
  tmp.replace(path)
  return path
