"""The programs of single links of the per-layer distillation step (`distill_steps.LayerwiseStep`):
each link's forward and backward, its part of the block's optimizer update, and each block's step count.

A link's forward and backward come in two forms, each a pair of functions that run the link's
programs (`switch_forward`/`switch_backward`, `sampled_op_forward`/`sampled_op_backward`):

- the switch: a layer is a `lax.switch` over its candidate ops, and its backward recomputes the
  sampled op; it works whatever each device samples. One forward and one backward per layer shape.
- sampled-op programs: with one device in all, the sampled ops are read back to the host once the
  paths are drawn, and each runs as a forward that keeps the residuals of its gradient (`jax.vjp`'s)
  and a backward from them: nothing is recomputed. The 15-cell ImageNet step ran 1.16x faster (same
  run, 2-core AMD EPYC), but as 302 programs instead of 82, each about 120 of the process's memory
  mappings on XLA:CPU (README, "Performance"); `usable` checks that there is room for them.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from dna_jax import host_memory
from dna_jax import parallel
from dna_jax import program_cache
from dna_jax import space as space_lib
from dna_jax.models import supernet

Array = jax.Array

# Memory mappings per compiled program on XLA:CPU, measured on an ImageNet layer shape (28 px x 40 channels):
# its six ops' forwards and backwards as twelve programs added 1,420 mappings, its switch forward and
# backward 497. The whole 15-cell ImageNet step (302 programs) took the process to 46,000-50,000 of
# Linux's default limit of 65,530 (2-core AMD EPYC); past the limit, XLA's compiler fails with 'Cannot
# allocate memory' and the process crashes.
MAPS_PER_PROGRAM = 120
MAPS_KEPT_FOR_OTHER_PROGRAMS = 16_384  # the rest of the step's programs and those of later stages


def _switch_forward(modules: tuple[Any, ...], params: Any, stats: Any, x: Array, op: Array) -> tuple[Array, Any]:
  """Per device: the link in training mode (its only module, or candidate op number op[0]); its output
  and its statistics, averaged over devices."""
  stats = parallel.varying(stats)
  if len(modules) == 1:
    y, new_stats = supernet.apply_module(modules[0], params, stats, x, True)
  else:
    names = space_lib.OP_NAMES
    apply_op = lambda j, x: supernet.apply_module(modules[j], params[names[j]], stats[names[j]], x, True)
    y, new_stats = supernet.switch_ops(apply_op, stats, op[0], x)
  return y, lax.pmean(new_stats, parallel.AXIS)


def _module_vjp(
  module: Any, input_grad: bool, params: Any, stats: Any, x: Array, dy: Array
) -> tuple[Any, Array | None]:
  """`module`'s parameter gradient in training mode (and, if `input_grad`, its input gradient) for output gradient dy."""
  forward = lambda p, x: supernet.apply_module(module, p, stats, x, True)[0]
  if input_grad:
    _, vjp = jax.vjp(forward, params, x)
    return vjp(dy)
  _, vjp = jax.vjp(lambda p: forward(p, x), params)
  return vjp(dy)[0], None


def _switch_backward(
  modules: tuple[Any, ...], input_grad: bool, params: Any, stats: Any, x: Array, op: Array, dy: Array
) -> tuple[Any, ...]:
  """Per device: device-averaged parameter gradients (and, if `input_grad`, this device's input gradient).

  A layer recomputes and differentiates only the sampled op, inside its branch of a `lax.switch`,
  whose other ops' gradients are zeros. The same numbers as differentiating `_switch_forward` with each
  op rematerialised, traced in 0.47 instead of 0.81 s per layer shape (ImageNet block 3, 2-core
  Intel Xeon): JAX's partial evaluation of the rematerialised switch was most of the tracing.
  """
  params, stats = parallel.varying(params), parallel.varying(stats)
  if len(modules) == 1:
    dparams, dx = _module_vjp(modules[0], input_grad, params, stats, x, dy)
  else:
    names = space_lib.OP_NAMES

    def branch(j: int) -> Callable[[Array, Array], tuple[Any, Array | None]]:
      def run(x: Array, dy: Array) -> tuple[Any, Array | None]:
        taken, dx = _module_vjp(modules[j], input_grad, params[names[j]], stats[names[j]], x, dy)
        return supernet.layer_gradient(params, j, taken), dx

      return run

    dparams, dx = lax.switch(op[0], [branch(j) for j in range(space_lib.NUM_OPS)], x, dy)
  dparams = lax.pmean(dparams, parallel.AXIS)
  return (dparams, dx) if input_grad else (dparams,)


def _forward(module: Any, params: Any, stats: Any, x: Array) -> tuple[Array, Any, tuple[Array, ...]]:
  """Per device: one candidate op (or the stem or DS) in training mode: its output, its statistics
  averaged over devices, and the residuals its gradient needs (each with a leading axis of 1)."""
  params, stats = parallel.varying(params), parallel.varying(stats)
  forward = lambda p, x: supernet.apply_module(module, p, stats, x, True)
  y, pullback, new_stats = jax.vjp(forward, params, x, has_aux=True)
  return y, lax.pmean(new_stats, parallel.AXIS), tuple(leaf[None] for leaf in jax.tree.leaves(pullback))


def _backward(
  modules: tuple[Any, ...],
  op: int,
  input_grad: bool,
  params: Any,
  stats: Any,
  x: Array,
  residuals: tuple[Array, ...],
  dy: Array,
) -> tuple[Any, ...]:
  """Per device: the link's parameter gradients (zeros but for op `op`), averaged over devices, from
  the residuals `_forward` kept (and, if `input_grad`, this device's input gradient). `stats`: op
  `op`'s statistics alone, all that tracing its forward again reads."""
  params, stats = parallel.varying(params), parallel.varying(stats)
  forward = lambda p, x: supernet.apply_module(modules[op], p, stats, x, True)
  # The pullback's structure (not its values) from tracing the forward again; x only lends its shape.
  pullback_shape = jax.eval_shape(lambda p, x: jax.vjp(forward, p, x, has_aux=True)[1], _part(params, modules, op), x)
  d_taken, dx = jax.tree.unflatten(jax.tree.structure(pullback_shape), [r[0] for r in residuals])(dy)
  dparams = lax.pmean(supernet.layer_gradient(params, op, d_taken) if len(modules) > 1 else d_taken, parallel.AXIS)
  return (dparams, dx) if input_grad else (dparams,)


def _link_update(
  optimizer: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any, Array]:
  """One link's part of its block's optimizer step, and its gradient's squared norm.

  The block's optimizers are elementwise (Adam, weight decay on kernels, a learning rate shared by
  every leaf), so each link updates on its own exactly as within the whole block.
  """
  updates, opt_state = optimizer.update(grads, opt_state, params)
  # One sum over the concatenated gradients: a reduction per leaf compiled as 2-3 kernels of its own,
  # 40% of the program's kernels (XLA compile of a 78-leaf layer's update 0.68 -> 0.51 s, 2-core Xeon).
  squared_norm = jnp.sum(jnp.square(jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])))
  return optax.apply_updates(params, updates), opt_state, squared_norm


def _step_and_grad_norm(step: Array, squared_norms: tuple[Array, ...]) -> tuple[Array, Array]:
  """The block's next step count and the norm of its whole gradient, from its links' squared norms."""
  return step + 1, jnp.sqrt(sum(squared_norms))


# Programs shared by every link (and cell, and step) with the same modules (or op): compiled once per input shape.
@functools.cache
def switch_forward_program(
  modules: tuple[Any, ...], mode: str, cache: program_cache.ProgramCache | None = None
) -> Callable[..., Any]:
  fn = parallel.per_device(functools.partial(_switch_forward, modules), mode, (False, False, True, True), (True, False))
  return program_cache.wrap(cache, fn, f'distill_link_forward{(modules, mode)!r}')


@functools.cache
def switch_backward_program(
  modules: tuple[Any, ...], input_grad: bool, mode: str, cache: program_cache.ProgramCache | None = None
) -> Callable[..., Any]:
  out = (False, True) if input_grad else (False,)
  fn = parallel.per_device(
    functools.partial(_switch_backward, modules, input_grad), mode, (False, False, True, True, True), out
  )
  return program_cache.wrap(cache, fn, f'distill_link_backward{(modules, input_grad, mode)!r}')


@functools.cache
def sampled_op_forward_program(
  module: Any, mode: str, cache: program_cache.ProgramCache | None = None
) -> Callable[..., Any]:
  fn = parallel.per_device(functools.partial(_forward, module), mode, (False, False, True), (True, False, True))
  return program_cache.wrap(cache, fn, f'distill_op_forward{(module, mode)!r}')


@functools.cache
def sampled_op_backward_program(
  modules: tuple[Any, ...], op: int, input_grad: bool, mode: str, cache: program_cache.ProgramCache | None = None
) -> Callable[..., Any]:
  out = (False, True) if input_grad else (False,)
  fn = parallel.per_device(
    functools.partial(_backward, modules, op, input_grad), mode, (False, False, True, True, True), out
  )
  return program_cache.wrap(cache, fn, f'distill_op_backward{(modules, op, input_grad, mode)!r}')


@functools.cache
def update_program(
  optimizer: optax.GradientTransformation, what: str, mode: str, cache: program_cache.ProgramCache | None = None
) -> Callable[..., Any]:
  """A link's optimizer step (`_link_update`); `what` describes `optimizer` for `cache`.

  Shared by every link with the same parameter shapes and optimizer: the 15-cell ImageNet step's
  six per-block updates (3,900 parameter arrays, one program each) took 36 of its 99 s of XLA compile
  (about 9 ms per array, on a 2-core Intel Xeon).
  """
  fn = parallel.per_device(functools.partial(_link_update, optimizer), mode, (False,) * 3, (False,) * 3)
  return program_cache.wrap(cache, fn, what and f'distill_link_update{(what, mode)!r}')


@functools.cache
def step_program(mode: str, cache: program_cache.ProgramCache | None = None) -> Callable[..., Any]:
  fn = parallel.per_device(_step_and_grad_norm, mode, (False, False), (False, False))
  return program_cache.wrap(cache, fn, f'distill_step_and_grad_norm{(mode,)!r}')


@functools.cache  # decided once: a second step of the same cells shares the programs the first compiled
def usable(cells: tuple[supernet.SupernetCell, ...]) -> bool:
  """Whether `cells` can train with each sampled op as programs of its own: with one device in all,
  and on XLA:CPU where their programs (a forward and a backward per candidate op of each link shape)
  fit in the memory mappings left, with room kept for other programs (a warning if not)."""
  if jax.device_count() != 1:
    return False
  if jax.default_backend() != 'cpu':
    return True
  room = host_memory.memory_map_room()
  shapes = {
    (modules, cell.layer_shape(l)[0] if l >= 0 else name) for cell in cells for name, modules, l in cell.units()
  }
  programs = 2 * sum(len(modules) for modules, _ in shapes)
  if room is None or programs * MAPS_PER_PROGRAM <= room - MAPS_KEPT_FOR_OTHER_PROGRAMS:
    return True
  logging.warning(
    'distill.sampled_op_programs: its %d programs would need about %d memory mappings and %d are left '
    '(vm.max_map_count); using one program per layer shape instead. Raise vm.max_map_count to use them.',
    programs,
    programs * MAPS_PER_PROGRAM,
    room,
  )
  return False


def switch_forward(
  call: Callable[..., Any],
  mode: str,
  cache: program_cache.ProgramCache | None,
  modules: tuple[Any, ...],
  params: Any,
  stats: Any,
  x: Array,
  op: Array,
) -> tuple[Array, Any, Array]:
  """A link's switch forward program, run by `call`; keeps its input for the backward, which recomputes the op."""
  y, new_stats = call(switch_forward_program(modules, mode, cache), params, stats, x, op)
  return y, new_stats, x


def switch_backward(
  call: Callable[..., Any],
  mode: str,
  cache: program_cache.ProgramCache | None,
  modules: tuple[Any, ...],
  input_grad: bool,
  params: Any,
  stats: Any,
  x: Array,
  op: Array,
  dy: Array,
) -> tuple[Any, ...]:
  """A link's switch backward program (recomputing its sampled op from its input x), run by `call`."""
  return call(switch_backward_program(modules, input_grad, mode, cache), params, stats, x, op, dy)


def sampled_op_forward(
  call: Callable[..., Any],
  mode: str,
  cache: program_cache.ProgramCache | None,
  modules: tuple[Any, ...],
  params: Any,
  stats: Any,
  x: Array,
  op: Any,
) -> tuple[Array, Any, Any]:
  """One link's sampled op (`op`, on the host) as its own forward program: its output, the link's new
  statistics, and what `sampled_op_backward` needs. Given a shape instead of an op (compiling ahead), every
  op's forward runs and the first op's output is returned."""
  ops = _taken_ops(modules, op)
  outputs = [
    call(sampled_op_forward_program(modules[j], mode, cache), _part(params, modules, j), _part(stats, modules, j), x)
    for j in ops
  ]
  y, taken_stats, _ = outputs[0]
  new_stats = {**stats, space_lib.OP_NAMES[ops[0]]: taken_stats} if len(modules) > 1 else taken_stats
  return y, new_stats, (x, [kept for _, _, kept in outputs])


def sampled_op_backward(
  call: Callable[..., Any],
  mode: str,
  cache: program_cache.ProgramCache | None,
  modules: tuple[Any, ...],
  input_grad: bool,
  params: Any,
  stats: Any,
  kept: Any,
  op: Any,
  dy: Array,
) -> tuple[Any, ...]:
  """The link's parameter gradients (and, if `input_grad`, its input gradient) from what `sampled_op_forward`
  kept: the sampled op's backward program (every op's when compiling ahead; the first op's results)."""
  x, residuals = kept
  results = [
    call(
      sampled_op_backward_program(modules, j, input_grad, mode, cache), params, _part(stats, modules, j), x, kept_j, dy
    )
    for j, kept_j in zip(_taken_ops(modules, op), residuals)
  ]
  return results[0]


def _taken_ops(modules: tuple[Any, ...], op: Any) -> tuple[int, ...]:
  """The op numbers a link runs: its only module, the sampled op, or all (given only a shape)."""
  if len(modules) == 1:
    return (0,)
  if isinstance(op, jax.ShapeDtypeStruct):
    return tuple(range(len(modules)))
  return (int(np.asarray(op).reshape(-1)[0]),)


def _part(tree: Any, modules: tuple[Any, ...], op: int) -> Any:
  """Op `op`'s part of a link's parameters or statistics."""
  return tree[space_lib.OP_NAMES[op]] if len(modules) > 1 else tree
