"""Programs of single links of the per-layer distillation step: each link's optimizer update, each
block's step count, and each link's sampled op as programs of its own (on one device).

`distill_steps.LayerwiseStep` runs a layer as a `lax.switch` over its candidate ops, whose backward
recomputes the sampled op, since each device may sample another. With one device in all, the sampled ops
are read back to the host once the paths are drawn, and each runs as a forward that keeps the residuals
of its gradient (`jax.vjp`'s) and a backward from them: nothing is recomputed. The 15-cell ImageNet
step ran 1.16x faster (same run, 2-core AMD EPYC), but as 302 programs instead of 82, each about 120 of
the process's memory mappings on XLA:CPU (README, "Performance"); `usable` checks that there
is room for them.
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
  names = space_lib.OP_NAMES
  taken_params = params[names[op]] if len(modules) > 1 else params
  forward = lambda p, x: supernet.apply_module(modules[op], p, stats, x, True)
  # The pullback's structure (not its values) from tracing the forward again; x only lends its shape.
  structure = jax.tree.structure(jax.eval_shape(lambda p, x: jax.vjp(forward, p, x, has_aux=True)[1], taken_params, x))
  d_taken, dx = jax.tree.unflatten(structure, [r[0] for r in residuals])(dy)
  if len(modules) > 1:
    zeros = {name: jax.tree.map(jnp.zeros_like, params[name]) for name in names if name != names[op]}
    d_taken = {**zeros, names[op]: d_taken}
  dparams = lax.pmean(d_taken, parallel.AXIS)
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


# Programs shared by every link (and cell, and step) with the same op: compiled once per input shape.
@functools.cache
def forward_program(module: Any, mode: str, cache: program_cache.ProgramCache | None = None) -> Callable[..., Any]:
  fn = parallel.per_device(functools.partial(_forward, module), mode, (False, False, True), (True, False, True))
  return program_cache.wrap(cache, fn, f'distill_op_forward{(module, mode)!r}')


@functools.cache
def backward_program(
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


def train_cell(
  call: Callable[..., Any],
  cell: supernet.SupernetCell,
  mode: str,
  cache: program_cache.ProgramCache | None,
  loss: Callable[..., Any],
  update: Callable[..., Any],
  params: Any,
  stats: Any,
  link_opt_state: Callable[[str], Any],
  inputs: Array,
  target: Array,
  link_ops: list[Any],
) -> tuple[Any, Any, dict[str, Any], list[Array], Array, Array]:
  """`LayerwiseStep.train_cell` with each link's sampled op (`link_ops`, on the host) run as its own
  forward, which keeps its residuals, and backward from them; `loss` and `update` are the step's loss
  and link-update programs, `link_opt_state(link)` a link's part of the optimizer state.

  Given shapes instead of ops (compiling ahead), every op's programs are run, the first op's outputs
  feeding the next link.
  """
  names = space_lib.OP_NAMES
  links = cell.units()
  taken = []  # per link: the op numbers run (one, or all when ops are only shapes)
  for (_, modules, _), op in zip(links, link_ops):
    if len(modules) == 1:
      taken.append((0,))
    elif isinstance(op, jax.ShapeDtypeStruct):
      taken.append(tuple(range(len(modules))))
    else:
      taken.append((int(np.asarray(op).reshape(-1)[0]),))
  part = lambda tree, modules, j: tree[names[j]] if len(modules) > 1 else tree
  x, link_inputs, residuals, new_stats = inputs, [], [], {}
  for (name, modules, _), ops in zip(links, taken):
    link_inputs.append(x)
    outputs = [
      call(forward_program(modules[j], mode, cache), part(params[name], modules, j), part(stats[name], modules, j), x)
      for j in ops
    ]
    x = outputs[0][0]
    residuals.append([kept for _, _, kept in outputs])
    taken_stats = outputs[0][1]
    new_stats[name] = {**stats[name], names[ops[0]]: taken_stats} if len(modules) > 1 else taken_stats
  d_x, mse, rel_l1 = call(loss, x, target)
  new_params, opt_states, squared_norms = {}, {}, []
  for i in reversed(range(len(links))):
    name, modules, _ = links[i]
    results = [
      call(
        backward_program(modules, j, i > 0, mode, cache),
        params[name],
        part(stats[name], modules, j),
        link_inputs[i],
        kept,
        d_x,
      )
      for j, kept in zip(taken[i], residuals[i])
    ]
    d_x = results[0][-1]
    new_params[name], opt_states[name], squared_norm = call(update, params[name], link_opt_state(name), results[0][0])
    squared_norms.append(squared_norm)
  return new_params, new_stats, opt_states, squared_norms, mse, rel_l1
