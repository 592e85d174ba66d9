"""Data parallelism: one per-device pure step, run under `jax.pmap` or `jit(shard_map)`.

A step is written per device with the named axis `AXIS`: it takes the (unreplicated)
state, the device's slice of the batch and any broadcast arguments, and returns a
state and metrics that are identical on every device (after `lax.pmean`). The same
function then runs under `jax.pmap` (in_axes None for state, 0 for the batch) or
under `jax.jit(jax.shard_map(...))` over a 1-D device mesh.

Gradient idiom (exact under both): differentiate with respect to a *varying* copy of
the parameters (`varying`), `pmean` the gradients, and update the original ones.
Differentiating with respect to the invariant parameters under shard_map yields
gradients already summed over devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = 'batch'
MODES = ('pmap', 'shard_map')


def varying(tree: Any) -> Any:
  """Marks a device-invariant pytree as varying over the data axis (before `jax.grad`)."""
  return lax.pcast(tree, AXIS, to='varying')


def device_index() -> jax.Array:
  """Global index of this device along the data axis (inside a step)."""
  return lax.axis_index(AXIS)


def make_mesh() -> Mesh:
  return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def data_parallel(
  step: Callable[..., Any], mode: str, num_broadcast: int = 0, donate_state: bool = False
) -> Callable[..., Any]:
  """Wraps `step(state, batch, *broadcast) -> (state, metrics)` for all devices.

  The returned function takes the state and broadcast arguments unreplicated and the
  batch as produced by `shard_batch`.
  """
  return per_device(
    step, mode, (False, True) + (False,) * num_broadcast, (False, False), donate_argnums=(0,) if donate_state else ()
  )


def per_device(
  fn: Callable[..., tuple[Any, ...]],
  mode: str,
  sharded_in: tuple[bool, ...],
  sharded_out: tuple[bool, ...],
  donate_argnums: tuple[int, ...] = (),
) -> Callable[..., tuple[Any, ...]]:
  """Wraps per-device `fn` (which returns a tuple) for all devices under `mode`.

  Each argument and result is either sharded over the data axis (True: the device sees its slice,
  as `shard_batch` lays batches out) or replicated (False: the same on every device, as `replicate`
  lays it out; a replicated result must be invariant, e.g. after `lax.pmean`). pmap needs a sharded
  argument, so under it a function of replicated arguments alone runs as a plain `jit` on the
  replicated arrays and must use no collectives.
  """
  if mode == 'pmap' and not any(sharded_in):
    return jax.jit(fn, donate_argnums=donate_argnums)
  if mode == 'pmap':
    axes = lambda flags: tuple(0 if sharded else None for sharded in flags)
    return jax.pmap(
      fn,
      axis_name=AXIS,
      in_axes=axes(sharded_in),
      out_axes=axes(sharded_out),
      donate_argnums=donate_argnums,
    )
  if mode == 'shard_map':
    specs = lambda flags: tuple(P(AXIS) if sharded else P() for sharded in flags)
    mapped = jax.shard_map(fn, mesh=make_mesh(), in_specs=specs(sharded_in), out_specs=specs(sharded_out))
    return jax.jit(mapped, donate_argnums=donate_argnums)
  raise ValueError(f'parallel mode must be one of {", ".join(MODES)}, got {mode!r}')


def shard_batch(batch: dict[str, np.ndarray], mode: str) -> Any:
  """Host batch shaped (local_devices, per_device, ...) -> what `data_parallel(mode)` expects."""
  if mode == 'pmap':
    return batch
  sharding = NamedSharding(make_mesh(), P(AXIS))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.reshape(x, (-1,) + x.shape[2:])), batch
  )


def check_global_batch(global_batch_size: int, what: str) -> int:
  """Per-device batch size; a clear error when the batch does not divide over the devices."""
  devices = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(
      f'{what}={global_batch_size} must be a positive multiple of the number of devices '
      f'({devices}: {jax.process_count()} process(es) x {jax.local_device_count()} local)'
    )
  return global_batch_size // devices


def replicate(tree: Any, mode: str) -> Any:
  """Puts a host pytree on the devices the way `data_parallel(mode)` returns its state.

  (With any other placement the step's second call would trace and compile again.)
  """
  if mode == 'pmap':
    sharding = NamedSharding(Mesh(np.array(jax.local_devices()), (AXIS,)), P())
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)
  sharding = NamedSharding(make_mesh(), P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def host_copy(tree: Any) -> Any:
  """NumPy copy of a replicated pytree (pmap outputs and global arrays alike, on any host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree)


# Steps dispatched but not finished. JAX dispatches asynchronously: without a bound, a training loop runs
# ahead of the devices until its next metrics fetch, and progress reports count dispatched steps (the demo
# teacher's report said 100% about 30 s before its last step ran, on 2 CPU cores). Two keep the next
# step queued while one runs; the wait cost nothing measurable (demo teacher, 79 steps: 63.8 s against
# 64.2 and 64.8 s without it, 2 CPU cores).
STEPS_IN_FLIGHT = 2


def wait_for_steps_in_flight(pending: list[tuple[int, Any]], in_flight: int = STEPS_IN_FLIGHT) -> None:
  """Blocks until at most the last `in_flight` steps of `pending` ((step, metrics), oldest first) are unfinished."""
  if len(pending) > in_flight:
    jax.block_until_ready(pending[-1 - in_flight][1])
