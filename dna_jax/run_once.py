"""Programs that run once (initialisers): on the CPU, compiled with less LLVM optimisation.

An initialiser (a model's `init`, an optimizer's `init`) runs once per process on tiny inputs, but XLA:CPU
spends as long optimising its machine code as a training step's: the demo's 11 supernet link
initialisers took 36.8 s to compile one after another, the demo teacher's `init` 5.6 s (2-core AMD EPYC,
Zen 4). At LLVM optimisation level 1 (`OPTIONS`) they take 21.1 s and 2.6 s, and all their variables came
out bit for bit the same; other initialisers may round a value's last bit differently (tested: equal
within float rounding). Level 0 saved a little more (17.5 s) but rounded some of the demo's initial values
differently, and its code runs over 2x slower, which a large model's initialiser would feel. Other
backends, and a process that set `jax_disable_most_optimizations` (level 0 already; the tests do), compile
as `jax.jit` does.
"""

from __future__ import annotations

from collections.abc import Callable
import threading
from typing import Any

import jax

OPTIONS = {'xla_backend_optimization_level': 1}


def jit(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, but on the CPU (unless most optimisations are off) each new signature of
  concrete arguments is compiled with `OPTIONS`. Called while tracing (inside another jit,
  `jax.eval_shape`), it is `jax.jit(fn)` itself. The programs compiled with `OPTIONS` are kept on the
  result's `programs` (a list); its `cache_size()` counts them and those `jax.jit` compiled itself."""
  jitted = jax.jit(fn, **jit_kwargs)
  programs: list[Any] = []
  lock = threading.Lock()

  def call(*args: Any) -> Any:
    if (
      jax.default_backend() != 'cpu'
      or jax.config.values.get('jax_disable_most_optimizations', False)
      or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
    ):
      return jitted(*args)
    with lock:
      # A compiled program checks its arguments' structure, types and placement before running and raises
      # TypeError or ValueError where they differ: then the next one is tried, or a new one compiled.
      for program in programs:
        try:
          return program(*args)
        except (TypeError, ValueError):
          continue
      program = jitted.lower(*args).compile(OPTIONS)
      programs.append(program)
    return program(*args)

  call.programs = programs
  call.cache_size = lambda: len(programs) + jitted._cache_size()
  return call
