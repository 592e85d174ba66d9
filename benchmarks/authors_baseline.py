"""The DNA authors' way of distilling and rating, in PyTorch, as a baseline measured in the same run.

Written for these benchmarks from the method as the authors' released code runs it (their code is not
used): the frozen EfficientNet-B7 teacher is re-run up to the cell's block for every cell
(`teacher.forward(inputs, end_block=stage)` in their `_train_epoch`), each cell of the supernet holds
the six candidate ops of every layer and runs the sampled one; MSE against the teacher's block output,
Adam. Rating (`_potential`): for every rating batch, the teacher's BatchNorm is recalibrated on the
reset batch and the teacher re-run; then, path after path, the path's BatchNorm is recalibrated on the
reset batch (a training-mode forward) and the path is evaluated. Random weights: speed does not depend
on them. Imported by distill_step.py and rate_paths.py; needs torch (requirements-torch.txt).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from dna_jax import space as space_lib
from dna_jax.models import efficientnet


class MBConv(nn.Module):
  """timm's inverted residual: 1x1 expand, BN, swish, kxk depthwise, BN, swish, SE, 1x1 project, BN."""

  def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, eps: float = 1e-5):
    super().__init__()
    hidden = cin * expansion
    self.expand = (
      nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=eps), nn.SiLU())
      if expansion != 1
      else nn.Identity()
    )
    self.depthwise = nn.Sequential(
      nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden, bias=False),
      nn.BatchNorm2d(hidden, eps=eps),
      nn.SiLU(),
    )
    squeeze = space_lib.se_width(cin)
    self.se_reduce, self.se_expand = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
    self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=eps))
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.depthwise(self.expand(x))
    scale = torch.sigmoid(self.se_expand(nn.functional.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
    y = self.project(y * scale)
    return y + x if self.residual else y


class Teacher(nn.Module):
  """EfficientNet-B7's stem and stages (Keras's scaling), returning every DNA block's output up to `end_block`."""

  def __init__(self, variant: str = 'b7'):
    super().__init__()
    model = efficientnet.variant(variant)
    stages = efficientnet.scaled_stages(model)
    stem = model.scaled_width(model.stem_width)
    self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem, eps=1e-3), nn.SiLU())
    self.stages = nn.ModuleList()
    cin = stem
    for stage in stages:
      layers = []
      for j in range(stage.repeats):
        layers.append(MBConv(cin, stage.width, stage.expansion, stage.kernel, stage.stride if j == 0 else 1, 1e-3))
        cin = stage.width
      self.stages.append(nn.Sequential(*layers))

  def forward(self, x: torch.Tensor, end_block: int) -> list[torch.Tensor]:
    """Outputs of DNA blocks 1..end_block (stages 2..end_block + 1)."""
    x = self.stages[0](self.stem(x))
    outputs = []
    for stage in self.stages[1 : end_block + 1]:
      x = stage(x)
      outputs.append(x)
    return outputs


class Cell(nn.Module):
  """One supernet cell: every layer holds the six candidate ops; `forward` runs one path."""

  def __init__(self, layer_shapes: list[tuple[int, int, int]], stem: tuple[int, int, int] | None = None):
    super().__init__()
    self.stem = None
    if stem is not None:
      width, ds, stride = stem
      self.stem = nn.Sequential(
        nn.Conv2d(3, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(), MBConv(width, ds, 1, 3, 1)
      )
    self.layers = nn.ModuleList(
      nn.ModuleList(MBConv(cin, cout, op.expansion, op.kernel, stride) for op in space_lib.OPS)
      for cin, cout, stride in layer_shapes
    )

  def forward(self, x: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    if self.stem is not None:
      x = self.stem(x)
    for ops, op in zip(self.layers, path):
      x = ops[op](x)
    return x


def _recalibrate(module: nn.Module, run) -> None:
  """Their BN_Correction: reset running statistics, momentum 1, one training-mode forward, back to eval."""
  for layer in module.modules():
    if isinstance(layer, nn.BatchNorm2d):
      layer.reset_running_stats()
      layer.momentum = 1.0
  module.train()
  with torch.no_grad():
    run()
  module.eval()


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def distill_step_seconds(
  teacher: Teacher, cells: list[tuple[int, Cell]], images: torch.Tensor, repeats: int = 3
) -> dict[str, float]:
  """Seconds of their step for every cell (teacher re-run up to the cell's block, student fwd+bwd, Adam).

  `cells`: (block index, Cell). Returns the sum over cells of the full step, and of the student part alone.
  """
  full = student = 0.0
  for k, cell in cells:
    optimizer = torch.optim.Adam(cell.parameters(), lr=1e-3, weight_decay=1e-4)
    path = (0,) * len(cell.layers)
    with torch.no_grad():
      outputs = teacher(images, end_block=k + 1)
    inputs, target = (images if k == 0 else outputs[k - 1]), outputs[k]

    def student_step(inputs=inputs, target=target, cell=cell, optimizer=optimizer, path=path):
      optimizer.zero_grad()
      loss = nn.functional.mse_loss(cell(inputs, path), target)
      loss.backward()
      optimizer.step()

    def full_step(k=k, cell=cell, student_step=student_step):
      with torch.no_grad():
        teacher(images, end_block=k + 1)
      student_step()

    cell.train()
    full += median_seconds(full_step, repeats)
    student += median_seconds(student_step, repeats)
  return {'full': full, 'student': student}


def rating_ms_per_path_per_image(
  cell: Cell, inputs: torch.Tensor, calib: torch.Tensor, target: torch.Tensor, paths: int = 8
) -> float:
  """Their `_potential` per path: recalibrate the path's BatchNorm on the reset batch, evaluate the batch."""
  rng = torch.Generator().manual_seed(0)
  chosen = [tuple(int(i) for i in torch.randint(0, 6, (len(cell.layers),), generator=rng)) for _ in range(paths)]

  def rate_all():
    for path in chosen:
      _recalibrate(cell, lambda path=path: cell(calib, path))
      with torch.no_grad():
        (cell(inputs, path) - target).abs().mean()

  seconds = median_seconds(rate_all, 2)
  return 1000 * seconds / (paths * len(inputs))


def teacher_rating_seconds(teacher: Teacher, images: torch.Tensor, calib: torch.Tensor, end_block: int) -> float:
  """Per rating batch: the teacher recalibrated on the reset batch, then re-run on the batch."""

  def once():
    _recalibrate(teacher, lambda: teacher(calib, end_block))
    with torch.no_grad():
      teacher(images, end_block)

  return median_seconds(once, 2)


def threads() -> int:
  return torch.get_num_threads()


def image_batch(batch: int, size: int = 224) -> torch.Tensor:
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
