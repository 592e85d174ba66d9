"""convert_authors: the authors' PyTorch DNA-a..d state dicts give the same logits in dna_jax.

The state dicts are written here from the Architecture with the authors' (timm) names and shapes,
independently of the converter's table, and run through an independent torch.nn.functional forward
pass in float64. dna_jax runs in float32.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from dna_jax import cli
from dna_jax import convert_authors
from dna_jax import space as space_lib

torch = pytest.importorskip('torch')
F = torch.nn.functional

IMAGE_SIZE = 64  # fully convolutional: small images test the same padding cases (even sizes, stride 2)
BATCH = 2


def _layer_specs(arch: space_lib.Architecture) -> list[tuple[str, int, int, int, int, int]]:
  """(torch prefix, in, out, expansion, kernel, stride) of the DS block and every MBConv layer."""
  specs = [('blocks.0.0', arch.stem_width, arch.ds_width, 1, 3, 1)]
  channels = arch.ds_width
  for stage, choice in enumerate(arch.blocks, start=1):
    for layer, op_id in enumerate(choice.ops):
      op = space_lib.OPS[op_id]
      specs.append(
        (
          f'blocks.{stage}.{layer}',
          channels,
          choice.cell.width,
          op.expansion,
          op.kernel,
          choice.cell.stride if layer == 0 else 1,
        )
      )
      channels = choice.cell.width
  return specs


def authors_state_dict(arch: space_lib.Architecture, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
  """Random weights under the authors' names/shapes; BN statistics and all biases randomised."""
  gen = torch.Generator().manual_seed(seed)
  sd = {}

  def conv(name, out_ch, in_ch, k, bias=False):
    sd[f'{name}.weight'] = torch.randn(out_ch, in_ch, k, k, generator=gen) * (2.0 / (in_ch * k * k)) ** 0.5
    if bias:
      sd[f'{name}.bias'] = 0.1 * torch.randn(out_ch, generator=gen)

  def bn(name, ch):
    sd[f'{name}.weight'] = 0.5 + torch.rand(ch, generator=gen)
    sd[f'{name}.bias'] = 0.1 * torch.randn(ch, generator=gen)
    sd[f'{name}.running_mean'] = 0.1 * torch.randn(ch, generator=gen)
    sd[f'{name}.running_var'] = 0.5 + torch.rand(ch, generator=gen)
    sd[f'{name}.num_batches_tracked'] = torch.tensor(1000)

  conv('conv_stem', arch.stem_width, 3, 3)
  bn('bn1', arch.stem_width)
  for prefix, in_ch, out_ch, expansion, kernel, _ in _layer_specs(arch):
    mid = in_ch * expansion
    squeeze = max(1, int(0.25 * in_ch))
    if expansion == 1:  # depthwise-separable block
      conv(f'{prefix}.conv_dw', mid, 1, kernel)
      bn(f'{prefix}.bn1', mid)
      conv(f'{prefix}.se.conv_reduce', squeeze, mid, 1, bias=True)
      conv(f'{prefix}.se.conv_expand', mid, squeeze, 1, bias=True)
      conv(f'{prefix}.conv_pw', out_ch, mid, 1)
      bn(f'{prefix}.bn2', out_ch)
    else:
      conv(f'{prefix}.conv_pw', mid, in_ch, 1)
      bn(f'{prefix}.bn1', mid)
      conv(f'{prefix}.conv_dw', mid, 1, kernel)
      bn(f'{prefix}.bn2', mid)
      conv(f'{prefix}.se.conv_reduce', squeeze, mid, 1, bias=True)
      conv(f'{prefix}.se.conv_expand', mid, squeeze, 1, bias=True)
      conv(f'{prefix}.conv_pwl', out_ch, mid, 1)
      bn(f'{prefix}.bn3', out_ch)
  conv('conv_head', arch.head_width, arch.blocks[-1].cell.width, 1)
  bn('bn2', arch.head_width)
  sd['classifier.weight'] = torch.randn(num_classes, arch.head_width, generator=gen) / arch.head_width**0.5
  sd['classifier.bias'] = 0.1 * torch.randn(num_classes, generator=gen)
  return sd


def torch_forward(arch: space_lib.Architecture, sd: dict[str, torch.Tensor], images: np.ndarray) -> np.ndarray:
  """The authors' net in torch.nn.functional, float64, eval mode; images NHWC."""
  w = {k: v.double() for k, v in sd.items()}

  def conv(x, name, stride=1, groups=1):
    k = w[f'{name}.weight'].shape[-1]
    pad = ((stride - 1) + (k - 1)) // 2  # PyTorch symmetric padding of the authors' builder
    return F.conv2d(x, w[f'{name}.weight'], w.get(f'{name}.bias'), stride, pad, groups=groups)

  def bn(x, name):
    return F.batch_norm(
      x,
      w[f'{name}.running_mean'],
      w[f'{name}.running_var'],
      w[f'{name}.weight'],
      w[f'{name}.bias'],
      training=False,
      eps=1e-5,
    )

  def swish(x):
    return x * torch.sigmoid(x)

  def se(x, prefix):
    s = x.mean((2, 3), keepdim=True)
    s = conv(swish(conv(s, f'{prefix}.se.conv_reduce')), f'{prefix}.se.conv_expand')
    return x * torch.sigmoid(s)

  x = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
  x = swish(bn(conv(x, 'conv_stem', stride=2), 'bn1'))
  for prefix, in_ch, out_ch, expansion, _, stride in _layer_specs(arch):
    if expansion == 1:
      y = swish(bn(conv(x, f'{prefix}.conv_dw', stride, groups=in_ch), f'{prefix}.bn1'))
      x = bn(conv(se(y, prefix), f'{prefix}.conv_pw'), f'{prefix}.bn2')  # no activation, no residual
      continue
    y = swish(bn(conv(x, f'{prefix}.conv_pw'), f'{prefix}.bn1'))
    y = swish(bn(conv(y, f'{prefix}.conv_dw', stride, groups=y.shape[1]), f'{prefix}.bn2'))
    y = bn(conv(se(y, prefix), f'{prefix}.conv_pwl'), f'{prefix}.bn3')
    x = y + x if stride == 1 and in_ch == out_ch else y
  x = swish(bn(conv(x, 'conv_head'), 'bn2')).mean((2, 3))
  return F.linear(x, w['classifier.weight'], w['classifier.bias']).numpy()


def _images(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _jax_logits(directory, depthwise: str) -> tuple[np.ndarray, dict]:
  model, variables, meta = convert_authors.load_converted(str(directory), depthwise=depthwise)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _images())
  return np.asarray(logits), meta


CASES = [  # (name, num_classes, how the file wraps the state dict, depthwise implementation)
  ('dna_a', 1000, 'plain', 'auto'),  # the default: shift_add on CPU
  ('dna_b', 10, 'ema_module_prefix', 'native'),  # native grouped convs compile faster on CPU
  ('dna_c', 1000, 'state_dict', 'native'),
  ('dna_d', 1000, 'plain', 'native'),
]


@pytest.mark.parametrize('name,num_classes,wrapping,depthwise', CASES)
def test_converted_logits_match_torch(tmp_path, capsys, name, num_classes, wrapping, depthwise):
  arch = space_lib.named_architecture(name)
  sd = authors_state_dict(arch, num_classes, seed=len(name) + num_classes)
  if wrapping == 'ema_module_prefix':
    stored = {
      'epoch': 349,
      'args': __import__('argparse').Namespace(model='DNA_b'),
      'state_dict': {f'module.{k}': torch.zeros_like(v) for k, v in sd.items()},
      'state_dict_ema': {f'module.{k}': v for k, v in sd.items()},
    }
  elif wrapping == 'state_dict':
    stored = {'state_dict': sd}
  else:
    stored = sd
  torch.save(stored, tmp_path / 'model.pth.tar')
  out = tmp_path / 'converted'
  assert (
    cli.call(
      convert_authors.main,
      convert_authors.FLAGS,
      ['--arch', name, '--checkpoint', str(tmp_path / 'model.pth.tar'), '--out', str(out)],
    )
    == 0
  ), capsys.readouterr().err
  logits, meta = _jax_logits(out, depthwise)
  expected = torch_forward(arch, sd, _images())
  assert logits.shape == (BATCH, num_classes)
  # float32 against float64 through ~20 layers: the error grows with the logits' scale, so the
  # bound is 1e-5 relative to the largest logit (absolute 1e-5 when logits are O(1)).
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * scale)
  assert meta == {
    'arch': str(arch),
    'arch_name': name,
    'num_classes': num_classes,
    'image_size': 224,
    'stem_stride': 2,
    'conventions': {'padding': 'symmetric', 'bn_epsilon': 1e-5, 'bn_momentum': 0.9},
    'normalization': 'imagenet',
    'source': meta['source'],
  }
  assert (
    'state_dict_ema' if wrapping == 'ema_module_prefix' else wrapping.replace('plain', 'plain state dict')
  ) in meta['source']


def _numpy_state_dict(name: str, num_classes: int = 10) -> dict[str, np.ndarray]:
  sd = authors_state_dict(space_lib.named_architecture(name), num_classes, seed=0)
  return {k: v.numpy() for k, v in sd.items() if not k.endswith('num_batches_tracked')}


def test_missing_tensor_is_named_with_expected_shape():
  sd = _numpy_state_dict('dna_a')
  del sd['blocks.3.1.se.conv_reduce.bias']
  with pytest.raises(convert_authors.ConversionError) as error:
    convert_authors.map_state_dict(space_lib.named_architecture('dna_a'), sd, arch_label='dna_a')
  message = str(error.value)
  assert 'architecture dna_a' in message
  assert "1 tensor(s) missing, first 'blocks.3.1.se.conv_reduce.bias' (expected shape (20))" in message
  assert 'surplus' not in message and 'wrong shape' not in message


def test_surplus_tensor_is_named():
  sd = _numpy_state_dict('dna_d')
  sd['blocks.6.1.conv_pw.weight'] = np.zeros((1920, 320, 1, 1), np.float32)
  with pytest.raises(convert_authors.ConversionError) as error:
    convert_authors.map_state_dict(space_lib.named_architecture('dna_d'), sd, arch_label='dna_d')
  message = str(error.value)
  assert 'architecture dna_d' in message
  assert (
    "1 surplus tensor(s) the architecture has no place for, first 'blocks.6.1.conv_pw.weight' "
    '(shape (1920, 320, 1, 1))' in message
  )
  assert 'missing' not in message


def test_misshaped_tensor_is_named_with_both_shapes():
  sd = _numpy_state_dict('dna_c')
  sd['conv_head.weight'] = np.zeros((1280, 321, 1, 1), np.float32)
  with pytest.raises(convert_authors.ConversionError) as error:
    convert_authors.map_state_dict(space_lib.named_architecture('dna_c'), sd, arch_label='dna_c')
  assert (
    "1 tensor(s) of the wrong shape, first 'conv_head.weight' has shape (1280, 321, 1, 1), "
    'expected shape (1280, 320, 1, 1)'
  ) in str(error.value)


def test_dna_b_file_given_as_dna_c_fails_cleanly(tmp_path, capsys):
  sd = authors_state_dict(space_lib.named_architecture('dna_b'), 10, seed=1)
  torch.save({'state_dict': sd}, tmp_path / 'dna_b.pth')
  out = tmp_path / 'out'
  code = cli.call(
    convert_authors.main,
    convert_authors.FLAGS,
    ['--arch', 'dna_c', '--checkpoint', str(tmp_path / 'dna_b.pth'), '--out', str(out)],
  )
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith('error: checkpoint does not fit architecture dna_c')
  assert 'Traceback' not in err
  # DNA-b's block 1 has 3 layers of k3e3/k5e3/k7e6, DNA-c's 2 layers of k5e6/k3e6 ...
  assert "first 'blocks.1.0.conv_pw.weight' has shape (48, 16, 1, 1), expected shape (96, 16, 1, 1)" in err
  assert "surplus tensor(s) the architecture has no place for, first 'blocks.1.2.conv_pw.weight'" in err
  # ... and its block 2 has 3 layers where DNA-c has 4.
  assert "missing, first 'blocks.2.3.conv_pw.weight' (expected shape (240, 40, 1, 1))" in err
  assert 'It fits dna_b: use --arch dna_b' in err
  assert not out.exists()


def test_no_ema_takes_state_dict_and_output_is_not_overwritten(tmp_path, capsys):
  arch = space_lib.named_architecture('dna_a')
  ema = authors_state_dict(arch, 10, seed=2)
  raw = authors_state_dict(arch, 10, seed=3)
  torch.save({'state_dict': raw, 'state_dict_ema': ema}, tmp_path / 'ckpt.pth')
  out = tmp_path / 'out'
  args = ['--arch', 'dna_a', '--checkpoint', str(tmp_path / 'ckpt.pth'), '--out', str(out), '--no_ema']
  assert cli.call(convert_authors.main, convert_authors.FLAGS, args) == 0
  _, variables, meta = convert_authors.load_converted(str(out))
  np.testing.assert_array_equal(variables['params']['head']['classifier']['bias'], raw['classifier.bias'].numpy())
  assert meta['source'].endswith('(state_dict)') and meta['num_classes'] == 10
  assert cli.call(convert_authors.main, convert_authors.FLAGS, args) == 2
  assert 'is not empty; choose another --out or pass --overwrite' in capsys.readouterr().err
  assert cli.call(convert_authors.main, convert_authors.FLAGS, args[:-1] + ['--overwrite']) == 0
  _, variables, meta = convert_authors.load_converted(str(out))
  np.testing.assert_array_equal(variables['params']['head']['classifier']['bias'], ema['classifier.bias'].numpy())
  assert meta['source'].endswith('(state_dict_ema)')
  assert sorted(os.listdir(out)) == ['meta.json', 'variables']
  assert json.loads((out / 'meta.json').read_text())['arch_name'] == 'dna_a'
  (out / 'notes.txt').write_text('not ours')  # --overwrite never deletes files it did not write
  assert cli.call(convert_authors.main, convert_authors.FLAGS, args[:-1] + ['--overwrite']) == 2
  assert 'holds more than a converted checkpoint (notes.txt)' in capsys.readouterr().err
  assert (out / 'notes.txt').exists()


def test_architecture_string_is_accepted_and_missing_torch_is_explained(tmp_path, monkeypatch, capsys):
  sd = authors_state_dict(space_lib.named_architecture('dna_a'), 10, seed=4)
  torch.save(sd, tmp_path / 'a.pth')
  text = str(space_lib.named_architecture('dna_a'))
  assert (
    cli.call(
      convert_authors.main,
      convert_authors.FLAGS,
      ['--arch', text, '--checkpoint', str(tmp_path / 'a.pth'), '--out', str(tmp_path / 'out')],
    )
    == 0
  )
  assert json.loads((tmp_path / 'out' / 'meta.json').read_text())['arch'] == text
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)  # `import torch` now raises ImportError
  assert (
    cli.call(
      convert_authors.main,
      convert_authors.FLAGS,
      ['--arch', 'dna_a', '--checkpoint', str(tmp_path / 'a.pth'), '--out', str(tmp_path / 'out2')],
    )
    == 2
  )
  assert 'needs torch, which is not installed: pip install -r requirements-torch.txt' in capsys.readouterr().err
