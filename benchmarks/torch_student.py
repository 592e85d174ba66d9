"""The authors' distillation step as PyTorch runs it, on this machine: the student part, and with
--teacher the whole step.

  pip install -r requirements-torch.txt
  PYTHONPATH=. python benchmarks/torch_student.py [--space imagenet|small] [--batch 8] [--steps 3] [--threads 0]
      [--teacher]

A stand-in written for this benchmark (not the authors' code, which is not vendored here): the same
supernet cells as `supernet.supernet_cells` (every layer holds the six candidate MBConvs; block 1's
cells own the stem and depthwise-separable block), built from torch.nn modules the way the authors'
PyTorch supernet is (NCHW, symmetric padding, BatchNorm eps 1e-5 and momentum 0.1, swish, SE with
biases), and trained the way their distillation loop trains a cell for one batch: one uniformly
sampled path (pinned layers keep their op), MSE against the teacher block's output, backward, and
Adam with L2 weight decay 1e-4 on conv kernels only, at the block's learning rate. Without --teacher
the teacher is not run: its block outputs are random tensors of the right shapes (speed does not
depend on their values), so this is the student part alone, the number the JAX step's student part is
compared with (`benchmarks/distill_programs.py --torch_student` prints both in one run). With
--teacher, the benchmark space's teacher (B7 for ImageNet; the same stages and widths as
`efficientnet.py`, random weights) runs before each cell as the authors' loop runs it: from the image
up to that cell's block, with BatchNorm in training mode and no gradient, giving the cell its input
and target; the step is then the authors' whole step (`distill_programs.py --torch_teacher` prints
it against the JAX step). Eager PyTorch compiles nothing; a warm-up (every candidate op of every
layer once, then one sampled step) is not timed.

Prints the median over --steps of a step (every cell of every block once, cell after cell, as the
authors' per-block runs do summed over blocks) and each block's share. --threads: torch's intra-op
threads (0: torch's default, the number of cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks import distill_step as step_benchmark
from benchmarks import machine_load
from dna_jax import host_memory
from dna_jax import space as space_lib
from dna_jax.models import efficientnet
from dna_jax.models import supernet

try:
  import torch
  from torch import nn
except ImportError:  # a clear error where the benchmark is asked for, not at import
  torch = nn = None

BN_EPSILON, BN_MOMENTUM, WEIGHT_DECAY = 1e-5, 0.1, 1e-4
LEARNING_RATES = (0.002, 0.005, 0.005, 0.005, 0.005, 0.002)


def require_torch() -> None:
  """A clear error when torch is not installed."""
  if torch is None:
    raise SystemExit('The PyTorch baseline needs torch: pip install -r requirements-torch.txt')


def symmetric_padding(kernel: int, stride: int) -> int:
  """PyTorch's padding on every side, as the authors' nets use it."""
  return space_lib.conv_padding(0, kernel, stride, 'symmetric')[0]


def make_mbconv(in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int) -> Any:
  """MBConv as the authors' supernet builds it: [1x1, BN, swish] -> kxk depthwise, BN, swish -> SE -> 1x1, BN."""

  class MBConv(nn.Module):
    def __init__(self):
      super().__init__()
      hidden = in_channels * expansion
      squeeze = space_lib.se_width(in_channels)
      bn = lambda c: nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=BN_MOMENTUM)
      self.expand = (
        nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), bn(hidden), nn.SiLU()) if expansion != 1 else None
      )
      pad = symmetric_padding(kernel, stride)
      self.depthwise = nn.Sequential(
        nn.Conv2d(hidden, hidden, kernel, stride, pad, groups=hidden, bias=False), bn(hidden), nn.SiLU()
      )
      self.se_reduce = nn.Conv2d(hidden, squeeze, 1)
      self.se_expand = nn.Conv2d(squeeze, hidden, 1)
      self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), bn(out_channels))
      self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
      y = self.expand(x) if self.expand is not None else x
      y = self.depthwise(y)
      gate = self.se_expand(nn.functional.silu(self.se_reduce(y.mean((2, 3), keepdim=True))))
      y = self.project(y * torch.sigmoid(gate))
      return y + x if self.residual else y

  return MBConv()


def make_cell(cell: supernet.SupernetCell) -> Any:
  """A supernet cell: the stem and DS block (block 1), then per layer its six candidate ops."""

  class Cell(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = None
      if cell.stem is not None:
        stem_width, ds_width, stem_stride = cell.stem
        self.stem = nn.Sequential(
          nn.Conv2d(3, stem_width, 3, stem_stride, symmetric_padding(3, stem_stride), bias=False),
          nn.BatchNorm2d(stem_width, eps=BN_EPSILON, momentum=BN_MOMENTUM),
          nn.SiLU(),
          make_mbconv(stem_width, ds_width, 1, 3, 1),
        )
      self.layers = nn.ModuleList()
      for l in range(cell.cell.layers):
        in_channels, out_channels, stride = cell.layer_shape(l)
        ops = [make_mbconv(in_channels, out_channels, op.expansion, op.kernel, stride) for op in space_lib.OPS]
        self.layers.append(nn.ModuleList(ops))

    def forward(self, x, path):
      if self.stem is not None:
        x = self.stem(x)
      for ops, op in zip(self.layers, path):
        x = ops[op](x)
      return x

  return Cell()


def make_teacher(model: efficientnet.EfficientNet) -> Any:
  """`model`'s stem and stages as torch.nn modules (random weights, the authors' layer conventions);
  called with images and `up_to` (a DNA block, 1-based) it returns DNA blocks 1..up_to's outputs."""
  stages = efficientnet.scaled_stages(model)

  class Teacher(nn.Module):
    def __init__(self):
      super().__init__()
      width = model.scaled_width(model.stem_width)
      self.stem = nn.Sequential(
        nn.Conv2d(3, width, 3, model.stem_stride, symmetric_padding(3, model.stem_stride), bias=False),
        nn.BatchNorm2d(width, eps=BN_EPSILON, momentum=BN_MOMENTUM),
        nn.SiLU(),
      )
      self.stages = nn.ModuleList()
      for stage in stages:
        layers = []
        for j in range(stage.repeats):
          layers.append(make_mbconv(width, stage.width, stage.expansion, stage.kernel, stage.stride if j == 0 else 1))
          width = stage.width
        self.stages.append(nn.Sequential(*layers))

    def forward(self, images, up_to):
      x, outputs = self.stem(images), []
      for stage in self.stages[: up_to + 1]:  # stage 1, then DNA blocks 1..up_to
        x = stage(x)
        outputs.append(x)
      return outputs[1:]

  return Teacher()


def make_optimizer(model: Any, learning_rate: float) -> Any:
  """Adam, L2 weight decay on conv kernels only (BatchNorm and bias parameters without)."""
  kernels = [p for p in model.parameters() if p.ndim > 1]
  others = [p for p in model.parameters() if p.ndim <= 1]
  groups = [{'params': kernels, 'weight_decay': WEIGHT_DECAY}, {'params': others, 'weight_decay': 0.0}]
  return torch.optim.Adam(groups, lr=learning_rate)


def with_pins(path: list[int], cell: space_lib.Cell) -> list[int]:
  """`path` with the cell's pinned layers set to their op."""
  return [op if pinned is None else pinned for op, pinned in zip(path, cell.pinned or (None,) * cell.layers)]


def sample_path(rng: np.random.Generator, cell: space_lib.Cell) -> list[int]:
  """DNA's sampling: each layer's op drawn uniformly and independently; pinned layers keep theirs."""
  return with_pins(rng.integers(0, space_lib.NUM_OPS, cell.layers).tolist(), cell)


def student_step_seconds(
  space: space_lib.SearchSpace,
  batch: int,
  image_size: int,
  stem_stride: int,
  steps: int,
  seed: int = 0,
  block_ids: list[int] | None = None,
  teacher_model: efficientnet.EfficientNet | None = None,
) -> dict[str, Any]:
  """The median seconds of the student part of a step over `steps` timed steps, and each block's median
  (`block_ids`: only those blocks, 0-based; default every block). With `teacher_model`, each cell's
  input and target come from that teacher run before it, as the authors' loop runs it (module docstring).

  Returns {'step_s' (the student part), 'steps_s' (every timed step's student part), 'blocks_s' (block
  name -> median), 'warmup_s'} and, with a teacher, 'teacher_s' and 'full_step_s' (medians per step).
  """
  require_torch()
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  sizes = space_lib.supernet_input_sizes(space, image_size, stem_stride)
  teacher = None if teacher_model is None else make_teacher(teacher_model).train()  # training-mode BN
  images = torch.randn(batch, 3, image_size, image_size)
  cells = []  # (block index, cell, model, optimizer, input, target)
  for k, block_cells in enumerate(supernet.supernet_cells(space, stem_stride=stem_stride)):
    if block_ids is not None and k not in block_ids:
      continue
    for cell in block_cells:
      model = make_cell(cell).eval()
      in_channels = 3 if cell.stem is not None else cell.in_channels
      inputs = images if k == 0 else torch.randn(batch, in_channels, sizes[k], sizes[k])
      with torch.no_grad():
        target = torch.randn(batch, *model(inputs[:1], [0] * cell.cell.layers).shape[1:])
      if teacher is not None:
        with torch.no_grad():
          outputs = teacher(images[:1], k + 1)
        for what, got, expected in (
          ('input', outputs[k - 1] if k else images[:1], inputs[:1]),
          ('target', outputs[k], target),
        ):
          if got.shape[1:] != expected.shape[1:]:
            raise ValueError(
              f'block {k + 1}: the teacher gives a {what} of shape {tuple(got.shape[1:])}, the cell needs {tuple(expected.shape[1:])}'
            )
      model.train()
      learning_rate = LEARNING_RATES[k] if k < len(LEARNING_RATES) else LEARNING_RATES[-1]
      cells.append((k, cell, model, make_optimizer(model, learning_rate), inputs, target))

  def step(op: int | None = None) -> tuple[dict[str, float], float]:
    """Every cell once, along a sampled path (or with every free layer on candidate op `op`, without
    the teacher): each block's student seconds, and the teacher's seconds."""
    seconds, teacher_seconds = {}, 0.0
    for k, cell, model, optimizer, inputs, target in cells:
      if teacher is not None and op is None:
        start = time.perf_counter()
        with torch.no_grad():
          outputs = teacher(images, k + 1)
        inputs, target = (images if k == 0 else outputs[k - 1]), outputs[k]
        teacher_seconds += time.perf_counter() - start
      start = time.perf_counter()
      path = sample_path(rng, cell.cell) if op is None else with_pins([op] * cell.cell.layers, cell.cell)
      optimizer.zero_grad(set_to_none=False)  # as torch 1.x's zero_grad: grads zeroed in place
      loss = nn.functional.mse_loss(model(inputs, path), target)
      loss.backward()
      optimizer.step()
      name = f'block{k + 1}'
      seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return seconds, teacher_seconds

  # Each op's first call allocates and picks its kernels: every candidate op of every layer runs first
  # (then one whole step, the teacher's first calls with it).
  start = time.perf_counter()
  for op in range(space_lib.NUM_OPS):
    step(op)
  step()
  warmup = time.perf_counter() - start
  timed = [step() for _ in range(steps)]
  totals = [sum(t.values()) for t, _ in timed]
  blocks = {name: statistics.median(t[name] for t, _ in timed) for name in timed[0][0]}
  result = {'step_s': statistics.median(totals), 'steps_s': totals, 'blocks_s': blocks, 'warmup_s': warmup}
  if teacher is not None:
    result['teacher_s'] = statistics.median(teacher_s for _, teacher_s in timed)
    result['full_step_s'] = statistics.median(total + teacher_s for total, (_, teacher_s) in zip(totals, timed))
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--space', choices=('imagenet', 'small'), default='imagenet')
  parser.add_argument('--batch', type=int, default=0, help='default: 8 (imagenet) or 128 (small)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (median)')
  parser.add_argument('--threads', type=int, default=0, help="torch's intra-op threads (0: its default)")
  parser.add_argument('--teacher', action='store_true', help='also run the teacher before each cell (the whole step)')
  args = parser.parse_args(argv)
  require_torch()
  if args.threads:
    torch.set_num_threads(args.threads)
  space, teacher_name, batch, image_size, stem_stride = step_benchmark.benchmark_space(args.space, args.batch)
  print(
    f'torch {torch.__version__}, {torch.get_num_threads()} threads; space {args.space}; batch {batch}, {image_size} px'
  )
  teacher_model = efficientnet.variant(teacher_name) if args.teacher else None
  result = student_step_seconds(space, batch, image_size, stem_stride, args.steps, teacher_model=teacher_model)
  print(f'warm-up (every op of every layer run once, not timed) {result["warmup_s"]:.1f} s')
  print(
    f'student part, every cell once: {result["step_s"]:.3f} s per step (median of {args.steps}: '
    + ', '.join(f'{t:.2f}' for t in result['steps_s'])
    + f'); load {machine_load.load()}'
  )
  print('per block: ' + ', '.join(f'{name} {s:.3f} s' for name, s in result['blocks_s'].items()))
  if teacher_model is not None:
    print(
      f"teacher ({teacher_name}, up to each cell's block, before every cell): {result['teacher_s']:.3f} s per step; "
      f'whole step {result["full_step_s"]:.3f} s (medians of {args.steps})'
    )
  return 0


if __name__ == '__main__':
  host_memory.restart_with_huge_pages()
  sys.exit(main())
