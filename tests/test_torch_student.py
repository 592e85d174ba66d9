"""The PyTorch stand-in for the authors' student part (benchmarks/torch_student.py) trains the same cells."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import space as space_lib
from dna_jax.models import efficientnet
from dna_jax.models import supernet

torch = pytest.importorskip('torch')
from benchmarks import torch_student  # noqa: E402  (needs torch)

SPACE = space_lib.parse_space('2 16 1@8,2@8; 1 24 1@12=k3e6', 16, 8)


def jax_link_sizes(cell: supernet.SupernetCell, size: int) -> list[list[int]]:
  """Per link (stem and DS together, then each layer's ops in order): each module's parameter count."""
  variables = jax.eval_shape(lambda: cell.init(jax.random.PRNGKey(0), supernet.zeros_like_input(cell, 1, size)))
  params = variables['params']
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  links = [[count(params['stem']) + count(params['ds'])]] if cell.stem is not None else []
  return links + [[count(params[f'layer{l}'][op]) for op in space_lib.OP_NAMES] for l in range(cell.cell.layers)]


def torch_link_sizes(model) -> list[list[int]]:
  count = lambda module: sum(p.numel() for p in module.parameters())
  links = [[count(model.stem)]] if model.stem is not None else []
  return links + [[count(op) for op in ops] for ops in model.layers]


def test_the_torch_cells_hold_the_same_parameters_as_the_supernet_cells():
  sizes = space_lib.supernet_input_sizes(SPACE, 32, 1)
  for k, cells in enumerate(supernet.supernet_cells(SPACE, stem_stride=1)):
    for cell in cells:
      assert torch_link_sizes(torch_student.make_cell(cell)) == jax_link_sizes(cell, sizes[k])


def test_a_step_trains_every_cell_along_a_path_and_keeps_pins():
  rng = np.random.default_rng(0)
  pinned = SPACE.blocks[1].cells[0]
  assert {tuple(torch_student.sample_path(rng, pinned)) for _ in range(20)} == {(0,)}
  assert torch_student.with_pins([4], pinned) == [0]
  free = SPACE.blocks[0].cells[1]
  assert torch_student.with_pins([5, 2], free) == [5, 2]
  assert {op for _ in range(50) for op in torch_student.sample_path(rng, free)} == set(range(6))
  result = torch_student.student_step_seconds(SPACE, 4, 32, 1, steps=2)
  assert set(result['blocks_s']) == {'block1', 'block2'}
  assert len(result['steps_s']) == 2 and all(t > 0 for t in result['steps_s'])
  assert result['step_s'] == pytest.approx(float(np.median(result['steps_s'])))


def test_kernels_alone_are_decayed():
  cell = supernet.supernet_cells(SPACE, stem_stride=1)[1][0]
  model = torch_student.make_cell(cell)
  decayed, plain = torch_student.make_optimizer(model, 0.005).param_groups
  assert decayed['weight_decay'] == 1e-4 and plain['weight_decay'] == 0.0
  assert all(p.ndim == 4 for p in decayed['params']) and all(p.ndim == 1 for p in plain['params'])
  assert len(decayed['params']) + len(plain['params']) == len(list(model.parameters()))


def test_the_torch_teacher_holds_the_same_parameters_and_feeds_each_cell():
  """The stand-in's teacher: our EfficientNet's stem and stages (parameter counts equal, stage by
  stage), and with it a step runs the teacher before every cell (the authors' whole step)."""
  model = efficientnet.variant('tiny')
  teacher = torch_student.make_teacher(model)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  params = variables['params']
  assert sum(p.numel() for p in teacher.stem.parameters()) == count(params['stem'])
  for i, stage in enumerate(teacher.stages, start=1):
    ours = {name: tree for name, tree in params.items() if name.startswith(f'stage{i}_')}
    assert sum(p.numel() for p in stage.parameters()) == count(ours) > 0
  with torch.no_grad():
    outputs = teacher(torch.zeros(2, 3, 32, 32), 2)
  assert [tuple(o.shape) for o in outputs] == [(2, 16, 16, 16), (2, 24, 8, 8)]
  fitting = space_lib.parse_space('2 16 1@8; 2 24 1@12', 16, 8)  # the tiny teacher's first two blocks
  result = torch_student.student_step_seconds(fitting, 4, 32, 1, steps=2, teacher_model=model)
  assert set(result['blocks_s']) == {'block1', 'block2'}
  assert result['teacher_s'] > 0 and result['step_s'] < result['full_step_s']
  with pytest.raises(ValueError, match='block 2: the teacher gives a target of shape'):
    torch_student.student_step_seconds(SPACE, 4, 32, 1, steps=1, teacher_model=model)  # block 2 at stride 1
