"""Not a benchmark: random variables for a model, made on the host without compiling its initializers.

The benchmarks' speed does not depend on the values. `jax.jit(model.init)` of EfficientNet-B7 took
40 s to compile on an H200 (about 60 s on 2 CPU cores), for values the benchmark then ignores.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from dna_jax import teacher as teacher_lib


def random_like(abstract: Any, seed: int = 0) -> Any:
  """Host arrays shaped like `abstract`'s leaves: kernels normal with 1/sqrt(fan-in) scale, BatchNorm
  scales and variances 1, biases and means 0 (finite activations through deep nets)."""
  rng = np.random.default_rng(seed)

  def leaf(path: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> np.ndarray:
    name = getattr(path[-1], 'key', str(path[-1]))
    if name in ('scale', 'var'):
      return np.ones(spec.shape, spec.dtype)
    if name == 'kernel':
      fan_in = math.prod(spec.shape[:-1]) or 1
      return (rng.standard_normal(spec.shape, np.float32) / math.sqrt(fan_in)).astype(spec.dtype)
    return np.zeros(spec.shape, spec.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def teacher_variables(model: Any) -> Any:
  """`random_like` the teacher `model`'s variables, on the default device."""
  return jax.device_put(random_like(teacher_lib.abstract_variables(model)))
