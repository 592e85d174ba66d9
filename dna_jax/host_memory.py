"""How this process's C allocator treats freed memory: kept for reuse when XLA runs on the CPU. (Also
how many memory mappings the process has left: `memory_map_room`.)

XLA:CPU allocates every program's temporary buffers with malloc on each run and frees them at the end.
With glibc's defaults, large blocks are mmap'd afresh each time and unmapped (or trimmed) when freed, so
every step pays a page fault and a zeroed page for each 4 KiB it touches: in the demo's teacher stage
(2-core AMD EPYC, 345 training steps) the kernel's page-fault handling took 143 s of system time against
235 s of user time. Measured on that stage (`--config.stages=teacher`, one run each, idle), by mode of
DNA_JAX_HOST_MALLOC:

- 'glibc': glibc's defaults; 207 and 217 s (two runs).
- 'reuse' (the default on the CPU): no mmap for large blocks and no trimming, so freed blocks are
  reused from the heap: 178 s (191-197 s in two variants). Compiling is not slowed (one backward
  program 2.2-2.3 s against 2.4-2.8 s).
- 'one_arena': also one malloc arena for all threads, so that the blocks XLA's worker threads allocate
  are reused as well (a thread's own arena maps blocks over 64 MiB afresh whatever the settings):
  108-127 s (three runs), system time 143 -> 9 s, the same test accuracy. But XLA's compiler threads
  then share one lock and one fragmented heap: compiles took 1.3-1.5x longer, and the demo's distill
  stage (initialisers and step compiled in threads) 273 s against 196 s. For runs that mostly train.

Huge pages (`restart_with_huge_pages`, called at the start of `python -m dna_jax.main` and of the
benchmark scripts): even with 'reuse', a block over 64 MiB that an XLA worker thread allocates (each
teacher training step of the demo: 773 and 66 MiB) is mapped afresh every time. Where Linux hands out
transparent huge pages on request ('madvise', the common default), the command restarts itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (read by glibc only when a process starts), so that malloc asks for
them: a fault per 2 MiB instead of per 4 KiB. The demo's teacher stage for 117 steps (2-core AMD EPYC,
warm compilation cache, one run each): 84.8 s with 'reuse' alone (24.5 M page faults, 51 s of system
time), 60.5 s with huge pages as well (0.36 M, 27 s), 59.0 s with 'one_arena' (8.5 M, 20 s); the whole demo
1.13-1.16x faster, compiling not slowed. Setting glibc.malloc.hugetlb in GLIBC_TUNABLES yourself (0 to
switch it off) stops the restart.

What is left of the zeroing (perf with call graphs, the same stage, 78 steps): about 20% of the cycles,
the kernel zeroing the huge pages that XLA's kernels touch first in its worker threads, i.e. those blocks
over 64 MiB, mapped afresh each step. 'one_arena' stops it once the heap has grown (no zeroing after the
first steps), yet its steps were no faster (2.53 against 2.83 steps per second, 62.6 against 58.1 s for
117 steps) and a distillation block's programs compiled 1.46x slower (first step 43.8 against 30.1 s);
one arena with a larger thread cache (glibc.malloc.tcache_count=4000) was worse still (2.0 steps per
second, 9.9 GB peak). So 'reuse' with huge pages stays the default.

Set on import of `dna_jax`, before JAX or TensorFlow start their threads (each of which takes an arena
of its own on its first allocation). 'reuse' applies when the process runs on the CPU: JAX_PLATFORMS
names only 'cpu', or no TPU or GPU plugin is installed. Nothing is done without glibc. The price: freed
memory is not returned to the system while the process runs (the teacher stage's peak resident size was
2.6 GB with glibc's defaults, 2.0-2.1 GB with 'reuse', 3.5-4.3 GB with 'one_arena').
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys

ENV = 'DNA_JAX_HOST_MALLOC'
MODES = ('glibc', 'reuse', 'one_arena')

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int

TUNABLES_ENV = 'GLIBC_TUNABLES'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
HUGE_PAGES_GLIBC = (2, 35)  # the first glibc with that tunable
HUGE_PAGES_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'

# Packages whose presence means JAX may run on an accelerator (TPU: libtpu; GPU: the PJRT plugins, which
# install under the jax_plugins namespace).
ACCELERATOR_PACKAGES = ('libtpu', 'jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def runs_on_cpu(environ: dict[str, str] | None = None) -> bool:
  """Whether JAX will run this process's programs on the CPU, judged before JAX is imported."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return all(p == 'cpu' for p in platforms)
  return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PACKAGES)


def wanted_mode(environ: dict[str, str] | None = None) -> str:
  """DNA_JAX_HOST_MALLOC if set (one of MODES), else 'reuse' on the CPU and 'glibc' elsewhere."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, '').strip()
  if mode and mode not in MODES:
    raise ValueError(f'{ENV} must be one of {", ".join(MODES)} (or unset: reuse on the CPU), got {mode!r}')
  return mode or ('reuse' if runs_on_cpu(environ) else 'glibc')


def set_mode(mode: str) -> bool:
  """Sets glibc's malloc as `mode` says (module docstring); False where nothing was set."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
  if mode == 'glibc' or platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)]
  if mode == 'one_arena':
    settings.append((_M_ARENA_MAX, 1))
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def set_wanted_mode() -> bool:
  """`set_mode(wanted_mode())`."""
  return set_mode(wanted_mode())


def huge_pages_wanted(
  environ: dict[str, str] | None = None, huge_pages_file: str = HUGE_PAGES_FILE, libc: tuple[str, str] | None = None
) -> bool:
  """Whether a command should restart so that malloc asks for transparent huge pages (module docstring):
  malloc is set to keep freed memory (not 'glibc'), glibc has the tunable, Linux gives huge pages on
  request ('madvise'; under 'always' they come unasked, under 'never' not at all), and GLIBC_TUNABLES does
  not set it already."""
  environ = os.environ if environ is None else environ
  if wanted_mode(environ) == 'glibc' or HUGE_PAGES_TUNABLE in environ.get(TUNABLES_ENV, ''):
    return False
  name, version = platform.libc_ver() if libc is None else libc
  try:
    if name != 'glibc' or tuple(int(part) for part in version.split('.')[:2]) < HUGE_PAGES_GLIBC:
      return False
    with open(huge_pages_file) as f:
      return '[madvise]' in f.read()
  except (OSError, ValueError):
    return False


def _start_environ() -> dict[str, str]:
  """The environment this process started with: imports may have added to os.environ since (JAX and
  TensorFlow do), and the restarted command should start as this one did."""
  try:
    with open('/proc/self/environ', 'rb') as f:
      entries = [os.fsdecode(entry) for entry in f.read().split(b'\0')]
  except OSError:
    return dict(os.environ)
  return dict(entry.split('=', 1) for entry in entries if '=' in entry)


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command line with malloc asking for huge pages, if
  `huge_pages_wanted`; returns where nothing is to be done. Call it first thing in a command's
  `__main__`, before any work (nothing of this process survives)."""
  if not huge_pages_wanted():
    return
  environ = _start_environ()
  tunables, setting = environ.get(TUNABLES_ENV), f'{HUGE_PAGES_TUNABLE}=1'
  environ[TUNABLES_ENV] = f'{tunables}:{setting}' if tunables else setting
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, environ)
  except (OSError, ValueError):
    return  # no interpreter or command line to restart (an embedded Python): run on without huge pages


def memory_map_room(maps_file: str = '/proc/self/maps', limit_file: str = '/proc/sys/vm/max_map_count') -> int | None:
  """How many more memory mappings this process may make before Linux refuses (vm.max_map_count less
  those it has); None where that cannot be read (not Linux).

  XLA:CPU maps its compiled code in many small regions, about 120 per program of the distillation step;
  past the limit, its compiler fails with 'Cannot allocate memory' and the process crashes.
  """
  try:
    with open(limit_file) as f:
      limit = int(f.read().split()[0])
    with open(maps_file) as f:
      used = sum(1 for _ in f)
  except (OSError, ValueError, IndexError):
    return None
  return limit - used
