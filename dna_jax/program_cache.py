"""Compiled programs kept across processes: JAX's persistent compilation cache and stored executables.

JAX's persistent compilation cache (`enable_compilation_cache`) skips XLA's compilation on a rerun, but
JAX still traces and lowers each program to look it up: about 30 s of the demo's distillation step on 2 CPU
cores (README, "Performance"). `ProgramCache` stores the compiled executable itself, keyed by what
built it instead of by its HLO: this package's source, the versions of the libraries that trace it, the
XLA flags and devices, a description of the program (`what`, e.g. the repr of the cells it trains) and
the abstract values and shardings of its arguments. A rerun, a resumed run or the next stage then loads
the executable without tracing or compiling. (On XLA:CPU the load itself is not free: 41-43 s for the
demo's step, most of it XLA deserialising its YNNPACK fusions; README, "Performance".)

A program whose description holds something that differs between processes (an object's address) is
not stored, nor is anything while JAX runs several processes (a pod slice; not supported yet), nor an
executable that JAX's persistent cache handed back instead of compiling it: stored again, such an
executable loaded in a new process but failed when run on XLA:CPU ("Function add_rsqrt_fusion not
found"; tested), so it is left to JAX's cache, which finds it after tracing. What this module stores,
JAX's cache does not store as well (`_no_persistent_cache_write`). A stored
file that cannot be loaded is compiled again and replaced; beyond a size the least recently used files
are deleted (`prune`). The files hold native code and are
unpickled: a cache directory must be trusted like the code itself.

`AheadRun` compiles a chain of programs (stored or not) from their arguments' shapes ahead of running
them, tracing each while other threads compile the ones before.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
import re
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax._src import config as jax_config  # for `_no_persistent_cache_write` only
from jax.experimental import serialize_executable

from dna_jax import files

_UNSTABLE = re.compile(r' at 0x[0-9a-fA-F]+')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'  # what JAX records for a persistent cache hit
_LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')


def _cache_root() -> str:
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'dna_jax')


def compilation_cache_dir(setting: str) -> str | None:
  """Where config.compilation_cache_dir puts JAX's persistent compilation cache (None: off)."""
  if setting != 'auto':
    return setting or None
  return os.path.join(_cache_root(), 'jax')


def enable_compilation_cache(setting: str, max_gb: float = 0.0) -> None:
  """Turns JAX's persistent compilation cache on in `setting`'s directory; with `max_gb` > 0, JAX deletes
  its least recently used entries beyond that size."""
  directory = compilation_cache_dir(setting)
  if directory is None:
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_compilation_cache_max_size', int(max_gb * 2**30) if max_gb > 0 else -1)
  # Cache every program that took a second or more to compile: the stages' steps take minutes on CPU.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info('JAX compilation cache: %s', directory)


def program_cache_dir(setting: str) -> str | None:
  """Where config.program_cache_dir stores compiled executables (None: off)."""
  if setting != 'auto':
    return setting or None
  return os.path.join(_cache_root(), 'programs')


@functools.cache
def environment_digest() -> str:
  """Digest of everything outside a program's description that shapes its executable."""
  parts = []
  package = pathlib.Path(__file__).parent
  for source in sorted(package.rglob('*.py')):
    parts.append(f'{source.relative_to(package)}\n{source.read_text()}')
  for library in _LIBRARIES:
    parts.append(f'{library}=={importlib.metadata.version(library)}')
  parts.append(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")} LIBTPU_INIT_ARGS={os.environ.get("LIBTPU_INIT_ARGS", "")}')
  # Every JAX flag (x64, matmul precision, jax_disable_most_optimizations, ...) but where caches live.
  parts.append(repr(sorted((k, repr(v)) for k, v in jax.config.values.items() if 'cache' not in k)))
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  parts.append(f'devices={devices} process={jax.process_index()}/{jax.process_count()}')
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()


def _abstract(x: Any) -> tuple[Any, ...]:
  """What a compiled executable fixes about one argument leaf (an array, or a `jax.ShapeDtypeStruct`
  with a sharding standing for one)."""
  if isinstance(x, jax.Array) or (isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      # P() and P(None, None) place an array alike (a jitted step returns the second for the first):
      # one key for both, and one executable, which accepts either.
      spec = tuple(sharding.spec)
      while spec and spec[-1] is None:
        spec = spec[:-1]
      return (jax.typeof(x), sharding.mesh, spec, sharding.memory_kind)
    return (jax.typeof(x), sharding)
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return (tuple(x.shape), str(x.dtype))
  return (type(x).__name__,)


class ProgramCache:
  """Compiled executables stored under `directory` (see the module docstring).

  `wrap(fn, what)` returns a drop-in for the jitted or pmapped `fn` that compiles each argument
  signature at most once per process and, across processes, loads what an earlier one stored.
  """

  def __init__(self, directory: str | os.PathLike[str], max_bytes: int | None = None):
    """`max_bytes`: after storing a program, the least recently used files are deleted until the
    directory holds at most this much (None: never pruned)."""
    self.directory = epath.Path(directory)
    self.max_bytes = max_bytes

  # Equal caches are one: builders memoized on their arguments (functools.cache) then hand a second
  # stage in the same process the programs already loaded, instead of loading (and mapping) them again.
  def __eq__(self, other: object) -> bool:
    return (
      isinstance(other, ProgramCache)
      and str(other.directory) == str(self.directory)
      and other.max_bytes == self.max_bytes
    )

  def __hash__(self) -> int:
    return hash((str(self.directory), self.max_bytes))

  def wrap(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    if jax.process_count() > 1:
      # Under pmap a host array is this process's part of the batch, but a whole value to an executable
      # compiled ahead of time (tried: the 2-process distillation test failed on the batch's shape).
      return fn
    if _UNSTABLE.search(what):
      logging.info('Not storing the compiled %s: its description holds an object address.', what[:80])
      return fn
    base = hashlib.sha256(f'{environment_digest()}\n{what}'.encode()).hexdigest()
    # signature -> its program, or the future of one that another thread compiles (`ahead`)
    compiled: dict[Any, Any] = {}
    last_used: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
      # The program used last first: it checks its arguments' structure, types and placement itself
      # before running, and raises TypeError or ValueError if they differ. Working out the signature of
      # every call cost 0.57 s per step of the 15-cell ImageNet step (31,500 array arguments).
      if last_used:
        try:
          return last_used[0](*args)
        except (TypeError, ValueError):
          pass
      signature = signature_of(args)
      program = compiled.get(signature)
      if program is None:
        program = self._load(base, signature, what)
        if program is None:
          program = self._compile_and_store(fn.lower(*args), base, signature, what)
      elif isinstance(program, concurrent.futures.Future):
        program = program.result()
      compiled[signature] = program
      last_used[:] = [program]
      return program(*args)

    def ahead(compile_in: concurrent.futures.Executor, *args: Any) -> tuple[Any, concurrent.futures.Future | None]:
      """For arguments (or `jax.ShapeDtypeStruct`s with shardings): the program's output shapes, and
      the future of its compilation in `compile_in` (None when it is loaded or known already)."""
      signature = signature_of(args)
      program = compiled.get(signature)
      if isinstance(program, concurrent.futures.Future):
        return program.out_info, None  # set below, when it was submitted
      if program is None:
        program = self._load(base, signature, what)
      if program is not None:
        compiled[signature] = program
        return program.out_info, None
      lowered = fn.trace(*args).lower()
      future = compile_in.submit(self._compile_and_store, lowered, base, signature, what)
      future.out_info = lowered.out_info
      compiled[signature] = future
      return lowered.out_info, future

    call.ahead = ahead
    return call

  def _path(self, base: str, signature: Any) -> epath.Path | None:
    """Where the program of `signature` is stored (None: not stored, its signature is unstable)."""
    described = repr(signature)
    if _UNSTABLE.search(described):
      return None
    digest = hashlib.sha256(f'{base}\n{described}'.encode()).hexdigest()
    return self.directory / f'{digest}.executable'

  def _load(self, base: str, signature: Any, what: str) -> Any:
    """The stored program of `signature`, or None."""
    path = self._path(base, signature)
    if path is None or not path.exists():
      return None
    began = time.time()
    try:
      payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
      by_id = {d.id: d for d in jax.devices()}
      devices = [by_id[i] for i in device_ids]
      program = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
    except Exception as e:  # a truncated file or another jaxlib's: compile it again
      logging.warning('Cannot load %s (%s: %s); compiling again.', path, type(e).__name__, e)
      return None
    logging.info('Loaded the compiled %s from %s in %.1f s.', _name(what), path, time.time() - began)
    _mark_used(path)
    return program

  def _compile_and_store(self, lowered: Any, base: str, signature: Any, what: str) -> Any:
    """`lowered` compiled, and stored unless JAX's persistent cache handed it back (module docstring)."""
    path, name = self._path(base, signature), _name(what)
    began = time.time()
    with _persistent_cache_hits() as hits, _no_persistent_cache_write(path is not None):
      program = lowered.compile()
    compile_seconds = time.time() - began
    if path is None:
      return program
    if hits:
      logging.info(
        "Took %s from JAX's compilation cache in %.1f s; not stored (module docstring).", name, compile_seconds
      )
      return program
    try:
      payload, in_tree, out_tree = serialize_executable.serialize(program)
      # The devices it runs on, in order (by default a loaded executable would span every device).
      device_ids = [d.id for d in program._executable._unloaded_executable.device_list]
      files.atomic_write_bytes(path, pickle.dumps((payload, in_tree, out_tree, device_ids)))
      logging.info('Compiled %s in %.1f s; stored in %s.', name, compile_seconds, path)
    except Exception as e:  # some programs cannot be serialized: they still run
      logging.warning('Compiled %s in %.1f s; not stored (%s: %s).', name, compile_seconds, type(e).__name__, e)
      return program
    if self.max_bytes is not None:
      self.prune(self.max_bytes, keep=path)
    return program

  def prune(self, max_bytes: int, keep: epath.Path | None = None) -> list[epath.Path]:
    """Deletes the least recently used stored programs until the rest take at most `max_bytes`
    (`keep` is never deleted); returns the deleted files."""
    stored = []
    for path in self.directory.glob('*.executable'):
      try:
        info = path.stat()
      except FileNotFoundError:  # deleted meanwhile by another process pruning the same directory
        continue
      stored.append((info.mtime, str(path), info.length, path))
    total, deleted = sum(length for _, _, length, _ in stored), []
    for _, _, length, path in sorted(stored, key=lambda item: item[:2]):
      if total <= max_bytes:
        break
      if keep is not None and str(path) == str(keep):
        continue
      path.unlink(missing_ok=True)  # or deleted meanwhile by another process
      total -= length
      deleted.append(path)
    if deleted:
      logging.info(
        'Pruned %d stored programs from %s (at most %d bytes are kept).', len(deleted), self.directory, max_bytes
      )
    return deleted


def signature_of(args: tuple[Any, ...]) -> tuple[Any, ...]:
  """What a compiled executable fixes about its arguments: their tree and each leaf's `_abstract`."""
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple(_abstract(x) for x in leaves))


def _name(what: str) -> str:
  return what.split('(', 1)[0][:40]


@contextlib.contextmanager
def _persistent_cache_hits() -> Iterator[list[str]]:
  """Collects JAX's persistent compilation cache hits (one entry each) of this thread while the block runs.

  (The distill stage compiles its step in one thread while another initialises the supernets.)
  """
  hits: list[str] = []
  thread = threading.get_ident()

  def listener(event: str, **kwargs: Any) -> None:
    if event == _CACHE_HIT_EVENT and threading.get_ident() == thread:
      hits.append(event)

  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)


@contextlib.contextmanager
def _no_persistent_cache_write(skip: bool) -> Iterator[None]:
  """While the block runs (with `skip`), JAX's persistent compilation cache does not store what this thread
  compiles, though it still hands back what it holds.

  A program this module stores would otherwise be serialised and written twice: JAX's write of the demo's
  distillation step (a 41 MB executable) took 5.6 s of the 50 s it took to compile (profiled, 2-core AMD
  EPYC). JAX has no public switch for one compilation; its minimum compile time for caching is a
  thread-local setting, raised to infinity here where JAX still has it (else the write happens).
  """
  minimum = getattr(jax_config, 'persistent_cache_min_compile_time_secs', None)
  if not skip or not callable(minimum):
    yield
    return
  with minimum(float('inf')):
    yield


def _mark_used(path: epath.Path) -> None:
  """Sets a loaded file's modification time to now, the order in which `prune` keeps files."""
  # On a remote file system (gs://) or a read-only directory this fails, and pruning goes by age.
  with contextlib.suppress(OSError):
    os.utime(os.fspath(path))


def wrap(cache: ProgramCache | None, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
  """`cache.wrap(fn, what)`, or `fn` itself when there is no cache."""
  return fn if cache is None else cache.wrap(fn, what)


def from_config(config: Any) -> ProgramCache | None:
  """The stored-executable cache config.program_cache_dir names (None when it is '')."""
  directory = program_cache_dir(config.program_cache_dir)
  if directory is None:
    return None
  return ProgramCache(directory, None if config.program_cache_max_gb <= 0 else int(config.program_cache_max_gb * 2**30))


def shapes_of(tree: Any) -> Any:
  """Each committed array of `tree` as a `jax.ShapeDtypeStruct` with its sharding.

  An uncommitted array (e.g. the teacher's variables straight from `jit`) stays itself: a call places it
  with its other arguments, which a ShapeDtypeStruct's sharding would fix instead (and a different
  program would be compiled).
  """
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=jax.typeof(x).weak_type)
  return jax.tree.map(lambda x: shape(x) if x.committed else x, tree)


class AheadRun:
  """Runs a chain of programs on shapes, as `run(program, *arguments)`: each is traced and lowered on the
  calling thread and compiled in `compile_in` (or loaded, if a `ProgramCache` stored it), and its output
  shapes feed the next, so that tracing overlaps compiling. Arguments are arrays or `shapes_of` them.

  Measured on blocks 3-4 of the ImageNet distillation step's forward and backward programs (2-core Intel Xeon):
  27.7 s one after another, 23.6 s with compiling in a second thread; XLA:CPU's compile alone keeps
  1.6 of the 2 cores busy.
  """

  def __init__(self, compile_in: concurrent.futures.Executor):
    self.compile_in = compile_in
    self.pending: list[concurrent.futures.Future] = []
    self.outputs: dict[Any, Any] = {}  # (program, signature) -> output shapes

  def __call__(self, program: Callable[..., Any], *args: Any) -> Any:
    key = (id(program), signature_of(args))
    if key not in self.outputs:
      ahead = getattr(program, 'ahead', None)  # a `ProgramCache.wrap`ped program
      if ahead is not None:
        out_info, future = ahead(self.compile_in, *args)
      else:  # a jitted program: JAX keeps what was compiled for the call with these shapes
        lowered = program.trace(*args).lower()
        out_info, future = lowered.out_info, self.compile_in.submit(lowered.compile)
      if future is not None:
        self.pending.append(future)
      self.outputs[key] = jax.tree.map(
        lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=i.sharding, weak_type=i.weak_type), out_info
      )
    return self.outputs[key]
