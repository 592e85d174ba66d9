"""Small file helpers shared by the stages: atomic text/JSON writes and PNG figures (local paths and gs://).

Readers never see a partial file: everything is written to a temporary name and renamed. No JAX here:
callers decide which process writes.
"""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

from etils import epath


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> epath.Path:
  """Writes `data` to `path` through a temporary file and a rename: readers never see a partial file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Per process and thread: two threads storing the same file at once (the distillation step's programs
  # compiled ahead) otherwise shared one temporary file, and one rename failed.
  tmp = path.parent / f'{path.name}.tmp-{os.getpid()}-{threading.get_ident()}'
  tmp.write_bytes(data)
  tmp.replace(path)
  return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> epath.Path:
  """`text` (UTF-8) written atomically, as atomic_write_bytes."""
  return atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], data: Any) -> epath.Path:
  """`data` as indented JSON, written atomically."""
  return atomic_write_text(path, json.dumps(data, indent=1) + '\n')


def read_json(path: str | os.PathLike[str]) -> Any:
  """The JSON content of `path`, or a ValueError naming the file (and line) when it is unreadable."""
  try:
    text = epath.Path(path).read_text()
  except OSError as e:
    raise ValueError(f'{path}: cannot read ({e.strerror or e})') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}, line {e.lineno}: not valid JSON ({e.msg})') from None


def pyplot() -> Any:
  """matplotlib.pyplot on the file-only Agg backend (imported on use: only plotting needs matplotlib)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> epath.Path:
  """Writes a matplotlib figure as PNG (atomically) and closes it."""
  png = io.BytesIO()
  fig.savefig(png, dpi=dpi, format='png')
  pyplot().close(fig)
  return atomic_write_bytes(path, png.getvalue())
