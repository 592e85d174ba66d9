"""Distillation supernet cells: every layer holds the parameters of all candidate ops.

A cell is a chain of layers; layer l holds one `layers.MBConv` per candidate op
(variables under `layer{l}/{op name}`). A path is a traced int array with one op
index per layer, so one compiled function serves every path (`lax.switch`). The
first layer carries the stride and reads the teacher's previous-block width; the
last layer outputs the teacher's width so the loss needs no adapter. A block-1 cell
also owns the student stem and depthwise-separable block, which read the image.

Cells are plain frozen dataclasses with pure `init`/`apply` over explicit variable
trees: the rating stage applies single ops of a layer to many prefixes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from dna_jax import run_once
from dna_jax import space as space_lib
from dna_jax.models import layers

Array = jax.Array
Variables = dict[str, Any]

# What training recomputes in the backward pass. Differentiating `lax.switch` keeps the residuals of
# every branch (zeros for the branches not taken), so without recomputation the step holds and writes
# six ops' intermediates per layer. 'op': the sampled op recomputed (only its input is kept; in the
# one-program step by `recomputing_switch`, the same numbers as each op under `jax.checkpoint`);
# 'dots': the 1x1 convolutions' outputs kept, the rest recomputed; 'none': plain autodiff. Measured on
# the demo space's full step (benchmarks/distill_step.py --space small --remat R, 2-core AMD EPYC, one
# run each): 'op' 1.10 s, 'dots' 1.21 s, 'none' 1.49 s (compile 162 / 177 / 179 s); on the 15-cell
# ImageNet step, before the depthwise conv's hand-written gradient, 'none' was ~5x slower than 'op'
# and did not compile within 16 GiB of host memory.
REMAT = ('op', 'dots', 'none')


def check_remat(remat: str, key: str = 'remat') -> None:
  """A clear error naming `key` unless `remat` is one of REMAT."""
  if remat not in REMAT:
    raise ValueError(f'{key} must be one of {", ".join(REMAT)}, got {remat!r}')


@dataclasses.dataclass(frozen=True)
class SupernetCell:
  """One cell of one block, as trained against the teacher."""

  cell: space_lib.Cell
  in_channels: int  # teacher width of the previous block (or the DS width for block 1)
  out_channels: int  # teacher width of this block
  conventions: layers.Conventions = layers.KERAS
  stem: tuple[int, int, int] | None = None  # (stem width, DS width, stem stride) for block 1
  bn_axis_name: str | None = None  # cross-device BatchNorm (rating's recalibration only)
  remat: str = 'op'  # what the backward pass recomputes: see REMAT

  def __post_init__(self):
    check_remat(self.remat)

  def layer_shape(self, l: int) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of layer l."""
    last = l == self.cell.layers - 1
    return (
      self.in_channels if l == 0 else self.cell.width,
      self.out_channels if last else self.cell.width,
      self.cell.stride if l == 0 else 1,
    )

  def op_module(self, l: int, op_id: int) -> layers.MBConv:
    return self.layer_modules(l)[op_id]

  def layer_modules(self, l: int) -> tuple[layers.MBConv, ...]:
    """Layer l's candidate ops, in `space.OPS` order."""
    _, out, stride = self.layer_shape(l)
    return candidate_ops(out, stride, self.conventions, self.bn_axis_name)

  def stem_modules(self) -> tuple[layers.Stem, layers.MBConv]:
    stem_width, ds_width, stem_stride = self.stem
    return (
      layers.Stem(stem_width, stem_stride, self.conventions, self.bn_axis_name),
      layers.MBConv(ds_width, 1, 3, 1, conventions=self.conventions, bn_axis_name=self.bn_axis_name),
    )

  def units(self) -> tuple[tuple[str, tuple[Any, ...], int], ...]:
    """The cell as a chain: (variables key, candidate modules, path index) per link.

    The stem and DS block (block 1) have one module and no path index (-1); layer l has its candidate
    ops, chosen by path[l]. Links with equal modules compute the same function of their variables.
    """
    links = []
    if self.stem is not None:
      links += [(name, (module,), -1) for name, module in zip(('stem', 'ds'), self.stem_modules())]
    return tuple(links + [(f'layer{l}', self.layer_modules(l), l) for l in range(self.cell.layers)])

  def link_input_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The input shape of each link (`units`) when the cell's inputs have `shape`: what `init` compiles for."""
    shapes = [shape]
    for _, modules, _ in self.units()[:-1]:
      shapes.append(_init_program(modules, shapes[-1])[1])
    return shapes

  def init(self, rng: Any, inputs: Array) -> Variables:
    """Variables of every op of every layer, for an example input batch (only its shape is read).

    Each link (`units`) is initialised by `init_link`, whose compiled program every link with the
    same modules and input shape shares: called outside jit, a block compiles one small program per
    distinct layer shape instead of one program holding every op of each cell (the ImageNet space's
    15 cells: 132.7 -> 72.4 s on 2 CPU cores, same values; benchmarks/supernet_init.py).
    """
    params, stats = {}, {}
    for (name, modules, l), shape in zip(self.units(), self.link_input_shapes(tuple(inputs.shape)), strict=True):
      keys = []
      for _ in modules:
        rng, key = jax.random.split(rng)
        keys.append(key)
      link_variables, _ = init_link(modules, tuple(keys), shape)
      if l < 0:  # the stem or DS: one module
        params[name], stats[name] = link_variables[0]['params'], link_variables[0]['batch_stats']
      else:
        params[name] = {op: v['params'] for op, v in zip(space_lib.OP_NAMES, link_variables)}
        stats[name] = {op: v['batch_stats'] for op, v in zip(space_lib.OP_NAMES, link_variables)}
    return {'params': params, 'batch_stats': stats}

  def apply_stem(self, variables: Variables, images: Array, train: bool) -> tuple[Array, dict[str, Any]]:
    """Student stem and DS block (block 1 only); returns output and updated statistics."""
    new_stats = {}
    x = images
    for name, module in zip(('stem', 'ds'), self.stem_modules()):
      x, new_stats[name] = apply_module(module, variables['params'][name], variables['batch_stats'][name], x, train)
    return x, new_stats

  def apply_op(self, variables: Variables, l: int, op_id: int, x: Array, train: bool) -> tuple[Array, Any]:
    """Op `op_id` of layer l alone; returns output and that op's updated statistics."""
    name = space_lib.OP_NAMES[op_id]
    params, stats = variables['params'][f'layer{l}'][name], variables['batch_stats'][f'layer{l}'][name]
    return apply_candidate_op(self.op_module(l, op_id), params, stats, x, train, self.remat)

  def apply(
    self, variables: Variables, inputs: Array, path: Array, train: bool = False
  ) -> tuple[Array, dict[str, Any]]:
    """The cell along `path` (int array, one op per layer); returns output and all batch stats.

    In training mode the statistics of the ops on the path are updated, the others kept.
    """
    new_stats = dict(variables['batch_stats'])
    x = inputs
    if self.stem is not None:
      x, stem_stats = self.apply_stem(variables, x, train)
      new_stats.update(stem_stats)
    for l in range(self.cell.layers):
      params, stats = variables['params'][f'layer{l}'], variables['batch_stats'][f'layer{l}']
      if train and self.remat == 'op':
        x, new_stats[f'layer{l}'] = recomputing_switch(self.layer_modules(l), params, stats, path[l], x)
      else:
        apply_op = lambda op_id, x, l=l: self.apply_op(variables, l, op_id, x, train)
        x, new_stats[f'layer{l}'] = switch_ops(apply_op, stats, path[l], x)
    return x, new_stats


@functools.cache
def _init_program(
  modules: tuple[Any, ...], shape: tuple[int, ...]
) -> tuple[Callable[[tuple[Array, ...]], tuple[Variables, ...]], tuple[int, ...]]:
  """The modules' `init` for float32 inputs of `shape` as one compiled program, and their output shape."""
  example = jax.ShapeDtypeStruct(shape, jnp.float32)
  output, _ = jax.eval_shape(modules[0].init_with_output, jax.random.PRNGKey(0), example)
  init = lambda keys: tuple(module.init(key, jnp.zeros(shape, jnp.float32)) for module, key in zip(modules, keys))
  return run_once.jit(init), tuple(output.shape)


def init_link(
  modules: tuple[Any, ...], keys: tuple[Array, ...], shape: tuple[int, ...]
) -> tuple[tuple[Variables, ...], tuple[int, ...]]:
  """Each module's variables (from its key) for inputs of `shape`, and the link's output shape.

  Only the initializers run (the forward pass that flax's init traces is dead code to XLA).
  """
  init, output_shape = _init_program(modules, tuple(shape))
  return init(keys), output_shape


def link_inputs(cell: SupernetCell, size: int) -> list[tuple[tuple[Any, ...], tuple[int, ...]]]:
  """(modules, one-image input shape) of each link of `cell` on `size` x `size` inputs: what `init` compiles."""
  shapes = cell.link_input_shapes(input_shape(cell, 1, size))
  return [(modules, shape) for (_, modules, _), shape in zip(cell.units(), shapes, strict=True)]


def compile_link_inits(cells: Sequence[tuple[SupernetCell, int]], rng: Any, threads: int) -> int:
  """Compiles every distinct link-init program of `cells` ((cell, input size) pairs), `threads` at a time.

  Each program is compiled by running it once on keys made from `rng` (the same kind of key the cells
  will be initialised with), so `SupernetCell.init` then finds it compiled; XLA compiles outside the
  GIL, so the programs compile in parallel. With fewer than 2 threads nothing is done (`init` compiles
  each program on first use). Returns the number of distinct programs.
  """
  programs = {link: _init_program(*link)[0] for cell, size in cells for link in link_inputs(cell, size)}
  if threads >= 2:

    def run(item: tuple[tuple[tuple[Any, ...], tuple[int, ...]], Any]) -> None:
      (modules, _), init = item
      jax.block_until_ready(init(tuple(jax.random.split(rng, len(modules)))))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(run, programs.items()))
  return len(programs)


def apply_module(module: Any, params: Any, batch_stats: Any, x: Array, train: bool) -> tuple[Array, Any]:
  """`module` on x; returns output and (in training mode, updated) BatchNorm statistics."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if not train:
    return module.apply(variables, x, train=False), batch_stats
  y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  return y, updates['batch_stats']


def apply_candidate_op(
  module: Any, params: Any, batch_stats: Any, x: Array, train: bool, remat: str
) -> tuple[Array, Any]:
  """`apply_module` for a candidate op, with what its backward pass recomputes (`remat`, see REMAT)."""
  run = functools.partial(apply_module, module, train=train)
  if remat == 'op':
    run = jax.checkpoint(run)
  elif remat == 'dots':
    run = jax.checkpoint(run, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return run(params, batch_stats, x)


def candidate_ops(
  out_channels: int, stride: int, conventions: layers.Conventions, bn_axis_name: str | None = None
) -> tuple[layers.MBConv, ...]:
  """One `layers.MBConv` per candidate op of `space.OPS` (the input width is the input's)."""
  return tuple(
    layers.MBConv(out_channels, op.expansion, op.kernel, stride, conventions=conventions, bn_axis_name=bn_axis_name)
    for op in space_lib.OPS
  )


def switch_ops(
  apply_op: Callable[[int, Array], tuple[Array, Any]], layer_stats: dict[str, Any], op: Array, x: Array
) -> tuple[Array, dict[str, Any]]:
  """The layer's op number `op` (traced) on x; returns output and the layer's statistics, that op's updated.

  `apply_op(op_id, x)` returns one op's output and statistics; `layer_stats` holds every op's.
  """

  def branch(op_id: int) -> Callable[[Array], tuple[Array, dict[str, Any]]]:
    def run(x: Array) -> tuple[Array, dict[str, Any]]:
      y, stats = apply_op(op_id, x)
      return y, {**layer_stats, space_lib.OP_NAMES[op_id]: stats}

    return run

  return lax.switch(op, [branch(j) for j in range(space_lib.NUM_OPS)], x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recomputing_switch(
  modules: tuple[Any, ...], params: Any, stats: dict[str, Any], op: Array, x: Array
) -> tuple[Array, dict[str, Any]]:
  """A layer of candidate `modules` in training mode: op number `op` (traced) on x; its output and the
  layer's statistics, that op's updated. Its gradient recomputes the sampled op alone, inside its
  branch of a `lax.switch`: what differentiating `switch_ops` over rematerialised ops (remat='op')
  computes, bit for bit on the demo's step, without JAX's partial evaluation and transposition of that
  switch. With the jitted ops, the one-program step traced and lowered in 47.4 instead of 81.6 s for the
  ImageNet space (49 layers, 24 shapes) and in 15.5-16.3 instead of 20.3-21.2 s for the demo's
  (benchmarks/step_tracing.py, 2-core AMD EPYC); its XLA compile and step time moved within their noise."""
  names = space_lib.OP_NAMES
  forward = lambda j, x: candidate_op_forward(modules[j])(params[names[j]], stats[names[j]], x)
  return switch_ops(forward, stats, op, x)


def _recomputing_switch_forward(modules, params, stats, op, x):
  return recomputing_switch(modules, params, stats, op, x), (params, stats, op, x)


def _recomputing_switch_backward(modules, residuals, cotangents):
  params, stats, op, x = residuals
  dy = cotangents[0]
  names = space_lib.OP_NAMES

  def branch(j: int) -> Callable[[Array, Array], tuple[Any, Array]]:
    def run(x: Array, dy: Array) -> tuple[Any, Array]:
      d_taken, dx = candidate_op_gradient(modules[j])(params[names[j]], stats[names[j]], x, dy)
      return layer_gradient(params, j, d_taken), dx

    return run

  d_params, dx = lax.switch(op, [branch(j) for j in range(len(modules))], x, dy)
  return d_params, None, None, dx


recomputing_switch.defvjp(_recomputing_switch_forward, _recomputing_switch_backward)


def layer_gradient(params: dict[str, Any], op: int, d_taken: Any) -> dict[str, Any]:
  """A layer's parameter gradient when only op number `op` ran: `d_taken` for it, zeros for the other ops."""
  names = space_lib.OP_NAMES
  zeros = {name: jax.tree.map(jnp.zeros_like, params[name]) for name in names if name != names[op]}
  return {**zeros, names[op]: d_taken}


# The op and its gradient as jitted functions, so that `recomputing_switch` traces, differentiates and
# lowers each op once per input shape however many layers of a cell, or cells of a block, share that
# shape. XLA inlines them: the program is the same (the demo's step bit for bit). Rating (`apply_op`) calls
# ops unjitted: the one demo run with jitted ops there recalibrated in 29.2 s against 22.7-24.9 s.
@functools.cache
def candidate_op_forward(module: Any) -> Callable[..., Any]:
  """Jitted (params, batch_stats, x) -> `module`'s output and updated statistics in training mode."""
  return jax.jit(functools.partial(apply_module, module, train=True))


@functools.cache
def candidate_op_gradient(module: Any) -> Callable[..., Any]:
  """Jitted (params, batch_stats, x, dy) -> the gradients of `module`'s output in training mode, with
  respect to its params and x, for output gradient dy (its forward recomputed)."""

  def gradient(params: Any, batch_stats: Any, x: Array, dy: Array) -> tuple[Any, Array]:
    forward = lambda p, x: apply_module(module, p, batch_stats, x, True)[0]
    return jax.vjp(forward, params, x)[1](dy)

  return jax.jit(gradient)


def supernet_cells(
  space: space_lib.SearchSpace,
  teacher_widths: tuple[int, ...] | None = None,
  conventions: layers.Conventions = layers.KERAS,
  stem_stride: int = 2,
  remat: str = 'op',
) -> list[list[SupernetCell]]:
  """All cells of all blocks: block k reads teacher block k-1 (block 1 reads the image)."""
  widths = teacher_widths or tuple(block.teacher_width for block in space.blocks)
  blocks = []
  for k, block in enumerate(space.blocks):
    stem = (space.stem_width, space.ds_width, stem_stride) if k == 0 else None
    in_channels = space.ds_width if k == 0 else widths[k - 1]
    blocks.append([SupernetCell(cell, in_channels, widths[k], conventions, stem, remat=remat) for cell in block.cells])
  return blocks


def with_pins(path: Array, cell: space_lib.Cell) -> Array:
  """`path` with the cell's pinned layers set to their op (the other layers unchanged)."""
  if not cell.pinned:
    return path
  pinned = jnp.array([-1 if op is None else op for op in cell.pinned], jnp.int32)
  return jnp.where(pinned >= 0, pinned, path)


def random_path(rng: Any, num_layers: int) -> Array:
  """DNA's sampling: each layer's op drawn uniformly and independently."""
  return jax.random.randint(rng, (num_layers,), 0, space_lib.NUM_OPS)


def fair_path(rng: Any, step: Array, num_layers: int) -> Array:
  """Fair sampling: over every run of NUM_OPS steps each op of a layer is drawn exactly once.

  `rng` must not depend on the step (it may depend on the device and cell).
  """
  cycle_key = jax.random.fold_in(rng, step // space_lib.NUM_OPS)
  keys = jax.random.split(cycle_key, num_layers)
  perms = jax.vmap(lambda k: jax.random.permutation(k, space_lib.NUM_OPS))(keys)
  return perms[:, step % space_lib.NUM_OPS]


def input_shape(cell: SupernetCell, batch: int, size: int) -> tuple[int, int, int, int]:
  """The shape of `cell`'s inputs: images for block 1, a teacher feature map otherwise."""
  return (batch, size, size, 3 if cell.stem is not None else cell.in_channels)


def zeros_like_input(cell: SupernetCell, batch: int, size: int) -> Array:
  """An example input for `init`."""
  return jnp.zeros(input_shape(cell, batch, size), jnp.float32)
