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
from typing import Any

import jax

OPTIONS = {'xla_backend_optimization_level': 1}


def jit(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, compiled with `OPTIONS` on the CPU unless most optimisations are off.

  Called while tracing (inside another jit, `jax.eval_shape`; JAX refuses compiler options on a nested
  jit) it is the plain `jax.jit(fn)`. The result's `cache_size()` counts the programs compiled for it.
  """
  plain = jax.jit(fn, **jit_kwargs)
  optimised = plain
  if jax.default_backend() == 'cpu' and not jax.config.values.get('jax_disable_most_optimizations', False):
    optimised = jax.jit(fn, compiler_options=OPTIONS, **jit_kwargs)
  jitted = (plain,) if optimised is plain else (plain, optimised)

  def call(*args: Any) -> Any:
    tracing = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
    return (plain if tracing else optimised)(*args)

  call.cache_size = lambda: sum(f._cache_size() for f in jitted)
  return call
