"""Freed memory kept for reuse on the CPU (host_memory): which mode applies, and that it stops the page faults."""

import os
import platform
import subprocess
import sys

import pytest

from dna_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Touches and frees a malloc block of argv[1] MiB five times, on a thread of its own if argv[2] is 'thread';
# prints the page faults of the last four. With argv[3] 'restart', restarts first as `python -m dna_jax.main`
# does, printing GLIBC_TUNABLES and whether a variable set after the start (as imports do) is there.
FAULTS = """
import ctypes, os, resource, sys, threading
from dna_jax import host_memory
if sys.argv[3:] == ['restart']:
  print('tunables', repr(os.environ.get('GLIBC_TUNABLES', '')), 'SET_AFTER_START' in os.environ, flush=True)
  os.environ['SET_AFTER_START'] = '1'
  host_memory.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def touch_and_free(size=int(sys.argv[1]) << 20):
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
def faults():
  touch_and_free()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(4):
    touch_and_free()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == 'thread':
  thread = threading.Thread(target=faults)
  thread.start()
  thread.join()
else:
  faults()
"""


def run_faults(mode: str, mib: int, where: str, *extra: str, tunables: str = '') -> str:
  env = {**os.environ, host_memory.ENV: mode, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  env.pop(host_memory.TUNABLES_ENV, None)
  if tunables:
    env[host_memory.TUNABLES_ENV] = tunables
  command = [sys.executable, '-c', FAULTS, str(mib), where, *extra]
  out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def page_faults(mode: str, mib: int = 64, where: str = 'main') -> int:
  return int(run_faults(mode, mib, where).split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc only')
def test_kept_memory_is_reused_without_page_faults():
  assert page_faults('glibc') >= 4 * 16384 * 0.9  # every block mmap'd afresh: a fault per 4 KiB page
  assert page_faults('reuse') <= 64
  assert page_faults('one_arena') <= 64
  # A thread's own arena maps blocks over 64 MiB afresh whatever the settings; one arena reuses them.
  assert page_faults('reuse', 96, 'thread') >= 4 * 24576 * 0.9
  assert page_faults('one_arena', 96, 'thread') <= 64


def test_reuse_on_the_cpu_unless_told_otherwise():
  assert host_memory.wanted_mode({'JAX_PLATFORMS': 'cpu'}) == 'reuse'
  assert host_memory.wanted_mode({'JAX_PLATFORMS': 'tpu'}) == 'glibc'
  assert host_memory.wanted_mode({'JAX_PLATFORMS': 'cuda,cpu'}) == 'glibc'
  assert host_memory.wanted_mode({'JAX_PLATFORMS': 'tpu', host_memory.ENV: 'one_arena'}) == 'one_arena'
  assert host_memory.wanted_mode({'JAX_PLATFORMS': 'cpu', host_memory.ENV: 'glibc'}) == 'glibc'


def test_a_bad_mode_names_the_variable_and_the_modes():
  with pytest.raises(ValueError, match=f'{host_memory.ENV} must be one of glibc, reuse, one_arena'):
    host_memory.wanted_mode({host_memory.ENV: '1'})
  with pytest.raises(ValueError, match='mode must be one of'):
    host_memory.set_mode('on')


@pytest.mark.skipif(
  not host_memory.huge_pages_wanted({'JAX_PLATFORMS': 'cpu'}), reason='no glibc hugetlb tunable or no madvise THP'
)
def test_a_restarted_command_maps_a_threads_large_blocks_in_huge_pages():
  lines = run_faults('reuse', 96, 'thread', 'restart').split('\n')
  # The script ran twice: first without the tunable, then, restarted, with it (and did not restart again),
  # in the environment it started with.
  assert lines[:2] == ["tunables '' False", "tunables 'glibc.malloc.hugetlb=1' False"]
  # 4 x 96 MiB touched: 98,304 faults in 4 KiB pages (the 'reuse' thread case above), 192 in 2 MiB pages.
  assert int(lines[2]) <= 4 * 24576 // 8
  # The user's own tunables are kept.
  lines = run_faults('reuse', 1, 'main', 'restart', tunables='glibc.malloc.tcache_count=8').split('\n')
  assert lines[1] == "tunables 'glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1' False"


def test_huge_pages_only_on_request_and_where_glibc_and_linux_give_them(tmp_path):
  def wanted(environ, setting='always [madvise] never', libc=('glibc', '2.36')):
    path = tmp_path / 'enabled'
    path.write_text(setting + '\n')
    return host_memory.huge_pages_wanted(environ, str(path), libc)

  cpu = {'JAX_PLATFORMS': 'cpu'}
  assert wanted(cpu)
  assert wanted({**cpu, host_memory.TUNABLES_ENV: 'glibc.malloc.arena_max=2'})
  assert not wanted({**cpu, host_memory.TUNABLES_ENV: 'glibc.malloc.hugetlb=0'})  # the user's setting stands
  assert not wanted({**cpu, host_memory.ENV: 'glibc'})
  assert not wanted({'JAX_PLATFORMS': 'tpu'})
  assert not wanted(cpu, '[always] madvise never')  # given unasked
  assert not wanted(cpu, 'always madvise [never]')
  assert not wanted(cpu, libc=('glibc', '2.31'))
  assert not wanted(cpu, libc=('', ''))
  assert not host_memory.huge_pages_wanted(cpu, str(tmp_path / 'missing'), ('glibc', '2.36'))
