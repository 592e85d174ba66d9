"""Converts the DNA authors' PyTorch ImageNet checkpoints (DNA-a..d) into dna_jax ChildNet variables.

  python -m dna_jax.convert_authors --arch dna_a --checkpoint DNA_a.pth.tar --out DIR

The authors' nets come from an early timm EfficientNet builder; their state-dict names are
`conv_stem, bn1, blocks.<stage>.<layer>.{conv_pw, bn1, conv_dw, bn2, se.conv_reduce, se.conv_expand,
conv_pwl, bn3}, conv_head, bn2, classifier` (stage 0 is the depthwise-separable block with
`conv_dw, bn1, se.*, conv_pw, bn2`). Every tensor must be used exactly once and every dna_jax variable
filled, with matching shapes. The converted net uses PyTorch conventions (`layers.TORCH`: symmetric
padding, BatchNorm eps 1e-5), recorded in DIR/meta.json so evaluation and export build the same net.

torch is optional: it is imported only to read the checkpoint file
(`pip install -r requirements-torch.txt`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import os
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import checkpoints
from dna_jax import cli
from dna_jax import space as space_lib
from dna_jax.models import child
from dna_jax.models import layers

CONVENTIONS = layers.TORCH
IMAGE_SIZE = 224
TORCH_INSTALL = 'pip install -r requirements-torch.txt (or: pip install torch)'


class ConversionError(ValueError):
  """A checkpoint that cannot be read or does not fit the architecture."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Where one torch tensor goes: `variables[collection][path...]`, re-laid-out by `layout`.

  layout: 'conv' (OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C)), 'pointwise' ((out,in,1,1) -> Dense
  (in,out)), 'linear' ((out,in) -> (in,out)) or 'vector' (unchanged).
  """

  torch_name: str
  collection: str
  path: tuple[str, ...]
  layout: str
  shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    s = self.shape
    if self.layout == 'conv':
      return (s[3], s[2], s[0], s[1])
    if self.layout == 'pointwise':
      return (s[1], s[0], 1, 1)
    if self.layout == 'linear':
      return (s[1], s[0])
    return s

  def to_flax(self, value: np.ndarray) -> np.ndarray:
    if self.layout == 'conv':
      value = value.transpose(2, 3, 1, 0)
    elif self.layout == 'pointwise':
      value = value[:, :, 0, 0].T
    elif self.layout == 'linear':
      value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def _torch_modules(arch: space_lib.Architecture) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch module, flax module path, kind) in network order; kind is 'conv', 'pointwise', 'linear' or 'bn'."""
  modules = [('conv_stem', ('stem', 'conv'), 'conv'), ('bn1', ('stem', 'bn'), 'bn')]
  se = [('se.conv_reduce', ('se', 'reduce'), 'pointwise'), ('se.conv_expand', ('se', 'expand'), 'pointwise')]
  ds = [
    ('conv_dw', ('dwconv',), 'conv'),
    ('bn1', ('dw_bn',), 'bn'),
    *se,
    ('conv_pw', ('project_conv',), 'pointwise'),
    ('bn2', ('project_bn',), 'bn'),
  ]
  modules += [(f'blocks.0.0.{t}', ('ds', *f), kind) for t, f, kind in ds]
  mbconv = [
    ('conv_pw', ('expand_conv',), 'pointwise'),
    ('bn1', ('expand_bn',), 'bn'),
    ('conv_dw', ('dwconv',), 'conv'),
    ('bn2', ('dw_bn',), 'bn'),
    *se,
    ('conv_pwl', ('project_conv',), 'pointwise'),
    ('bn3', ('project_bn',), 'bn'),
  ]
  for k, choice in enumerate(arch.blocks, start=1):
    for l in range(choice.cell.layers):
      modules += [(f'blocks.{k}.{l}.{t}', (f'block{k}_layer{l}', *f), kind) for t, f, kind in mbconv]
  modules += [
    ('conv_head', ('head', 'conv'), 'pointwise'),
    ('bn2', ('head', 'bn'), 'bn'),
    ('classifier', ('head', 'classifier'), 'linear'),
  ]
  return modules


@functools.lru_cache(maxsize=16)
def tensor_map(arch: space_lib.Architecture, num_classes: int) -> tuple[TensorMap, ...]:
  """Every torch tensor of the authors' net for `arch`, in network order, with its dna_jax destination."""
  model = child.ChildNet(arch, num_classes=num_classes, conventions=CONVENTIONS)
  images = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  leaves = {
    (collection, *(k.key for k in path)): leaf.shape
    for collection in shapes
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
  }
  entries = []
  for torch_module, flax_module, kind in _torch_modules(arch):
    if kind == 'bn':
      fields = [
        ('weight', 'params', 'scale'),
        ('bias', 'params', 'bias'),
        ('running_mean', 'batch_stats', 'mean'),
        ('running_var', 'batch_stats', 'var'),
      ]
    else:
      fields = [('weight', 'params', 'kernel'), ('bias', 'params', 'bias')]
    for torch_field, collection, flax_field in fields:
      key = (collection, *flax_module, flax_field)
      if key in leaves:
        layout = kind if flax_field == 'kernel' else 'vector'
        entries.append(TensorMap(f'{torch_module}.{torch_field}', collection, key[1:], layout, leaves.pop(key)))
  if leaves:  # ChildNet grew a variable this table does not know: a bug here, not in the checkpoint.
    raise RuntimeError(f'no torch tensor maps to dna_jax variable(s) {sorted("/".join(k) for k in leaves)}')
  return tuple(entries)


def _format_shape(shape: Sequence[int]) -> str:
  return '(' + ', '.join(str(int(d)) for d in shape) + ')'


def _mismatches(
  entries: Sequence[TensorMap], state_dict: Mapping[str, np.ndarray]
) -> tuple[list[TensorMap], list[str], list[TensorMap]]:
  """(missing, surplus, mis-shaped) tensors of `state_dict` against `entries`."""
  expected = {e.torch_name for e in entries}
  missing = [e for e in entries if e.torch_name not in state_dict]
  surplus = [name for name in state_dict if name not in expected]
  misshaped = [
    e for e in entries if e.torch_name in state_dict and tuple(state_dict[e.torch_name].shape) != e.torch_shape
  ]
  return missing, surplus, misshaped


def matching_named_architectures(state_dict: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
  """Named architectures whose every tensor name and shape the state dict fits exactly."""
  return [
    name
    for name, arch in space_lib.NAMED_ARCHITECTURES.items()
    if not any(_mismatches(tensor_map(arch, num_classes), state_dict))
  ]


def infer_num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
  weight = state_dict.get('classifier.weight')
  return int(weight.shape[0]) if weight is not None and len(weight.shape) == 2 else None


def map_state_dict(
  arch: space_lib.Architecture,
  state_dict: Mapping[str, np.ndarray],
  num_classes: int | None = None,
  arch_label: str | None = None,
) -> tuple[dict[str, Any], int]:
  """Flax variables ({'params', 'batch_stats'}) of the ChildNet of `arch` from an authors'-names state dict.

  `state_dict` maps torch names (no 'module.' prefix, no num_batches_tracked) to arrays. `num_classes`
  defaults to the classifier's output size. Returns (variables, num_classes); raises ConversionError
  naming the first missing, surplus and mis-shaped tensor when the state dict does not fit exactly.
  """
  inferred = infer_num_classes(state_dict)
  num_classes = num_classes or inferred or 1000
  entries = tensor_map(arch, num_classes)
  missing, surplus, misshaped = _mismatches(entries, state_dict)
  if missing or surplus or misshaped:
    label = arch_label or 'given'
    problems = []
    if missing:
      first = missing[0]
      problems.append(
        f'{len(missing)} tensor(s) missing, first {first.torch_name!r} '
        f'(expected shape {_format_shape(first.torch_shape)})'
      )
    if surplus:
      problems.append(
        f'{len(surplus)} surplus tensor(s) the architecture has no place for, first '
        f'{surplus[0]!r} (shape {_format_shape(state_dict[surplus[0]].shape)})'
      )
    if misshaped:
      first = misshaped[0]
      problems.append(
        f'{len(misshaped)} tensor(s) of the wrong shape, first {first.torch_name!r} has shape '
        f'{_format_shape(state_dict[first.torch_name].shape)}, expected shape '
        f'{_format_shape(first.torch_shape)}'
      )
    message = f'checkpoint does not fit architecture {label} ({arch}, {num_classes} classes): ' + '; '.join(problems)
    fits = [name for name in matching_named_architectures(state_dict, inferred or num_classes) if name != arch_label]
    if fits:
      message += f'. It fits {" and ".join(fits)}: use --arch {fits[0]}'
    raise ConversionError(message)
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for entry in entries:
    node = variables[entry.collection]
    for key in entry.path[:-1]:
      node = node.setdefault(key, {})
    node[entry.path[-1]] = entry.to_flax(np.asarray(state_dict[entry.torch_name]))
  return variables, num_classes


def _import_torch() -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError(f'reading PyTorch checkpoints needs torch, which is not installed: {TORCH_INSTALL}') from None
  return torch


def select_state_dict(checkpoint: Any, use_ema: bool = True) -> tuple[Mapping[str, Any], str]:
  """The model state dict inside a loaded checkpoint, and which entry it came from.

  Accepts a plain state dict or a dict holding it under 'state_dict_ema' (preferred unless
  `use_ema` is False) or 'state_dict'.
  """
  if not isinstance(checkpoint, Mapping):
    raise ConversionError(f'expected a dict in the checkpoint file, found {type(checkpoint).__name__}')
  if use_ema and checkpoint.get('state_dict_ema') is not None:
    return checkpoint['state_dict_ema'], 'state_dict_ema'
  if checkpoint.get('state_dict') is not None:
    return checkpoint['state_dict'], 'state_dict'
  if checkpoint and all(hasattr(v, 'shape') for v in checkpoint.values()):
    return checkpoint, 'plain state dict'
  wanted = "'state_dict_ema' or 'state_dict'" if use_ema else "'state_dict' (--no_ema)"
  raise ConversionError(
    f'no model weights found in the checkpoint: expected a state dict or a dict with '
    f'{wanted}; top-level keys are {sorted(map(str, checkpoint))[:10]}'
  )


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """float32 NumPy arrays, 'module.' prefixes (DataParallel) stripped, num_batches_tracked dropped."""
  cleaned = {}
  for name, tensor in state_dict.items():
    name = name[len('module.') :] if name.startswith('module.') else name
    if name.endswith('num_batches_tracked'):
      continue
    if hasattr(tensor, 'detach'):
      tensor = tensor.detach().cpu().float().numpy()
    cleaned[name] = np.asarray(tensor, dtype=np.float32)
  return cleaned


def _load_error(error: Exception) -> str:
  """The useful part of a torch.load error (its safe loader wraps the cause in a long explanation)."""
  text = str(error).strip() or type(error).__name__
  if 'WeightsUnpickler error:' in text:
    cause = text.split('WeightsUnpickler error:', 1)[1].strip().splitlines()[0].split('. Please use')[0]
    return (
      f'the safe loader (weights_only) refused it: {cause.rstrip(".")}. If the file comes from a source '
      'you trust, retry with --trust_pickle'
    )
  return text.splitlines()[0].rstrip('.') + ' (is it a PyTorch checkpoint file?)'


def read_torch_checkpoint(
  path: str, use_ema: bool = True, trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], str]:
  """(state dict as NumPy arrays, entry it came from) of a PyTorch checkpoint file."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise ConversionError(f'checkpoint file not found: {path}')
  try:
    if trust_pickle:
      checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    else:
      # timm training checkpoints also pickle their argparse arguments.
      with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
    raise ConversionError(f'cannot read PyTorch checkpoint {path}: {_load_error(e)}') from None
  state_dict, entry = select_state_dict(checkpoint, use_ema)
  return clean_state_dict(state_dict), entry


def make_meta(arch: space_lib.Architecture, arch_name: str | None, num_classes: int, source: str) -> dict[str, Any]:
  """The meta.json record of a converted net (`checkpoints.child_meta` plus 'arch_name' and 'source')."""
  return checkpoints.child_meta(
    arch, num_classes, IMAGE_SIZE, CONVENTIONS, 'imagenet', arch_name=arch_name, source=source
  )


def check_output_directory(directory: str, overwrite: bool) -> None:
  """Refuses a non-empty `directory` unless `overwrite`, and then only one holding a child checkpoint."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ConversionError(f'--out {directory} exists and is not a directory')
  entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  if not entries:
    return
  if not overwrite:
    raise ConversionError(f'output directory {directory} is not empty; choose another --out or pass --overwrite')
  others = [name for name in entries if name not in (checkpoints.CHILD_META, checkpoints.VARIABLES_DIR)]
  if others:  # --overwrite replaces the whole directory: never delete what this tool did not write
    raise ConversionError(
      f'--overwrite would delete {directory}, which holds more than a converted checkpoint '
      f'({", ".join(others[:5])}); delete it yourself or choose another --out'
    )


def load_converted(directory: str, **options: Any) -> tuple[child.ChildNet, dict[str, Any], dict[str, Any]]:
  """(model, variables, meta) of a converted directory: `checkpoints.load_child`, the one reader.

  `options` (dtype, depthwise, bn_axis_name) go to it.
  """
  return checkpoints.load_child(directory, **options)


def convert(
  arch_spec: str,
  checkpoint: str,
  out: str,
  num_classes: int | None = None,
  use_ema: bool = True,
  overwrite: bool = False,
  trust_pickle: bool = False,
) -> dict[str, Any]:
  """Reads, maps and writes one checkpoint; returns the metadata written."""
  arch = space_lib.load_architecture(arch_spec)
  arch_name = next((name for name, named in space_lib.NAMED_ARCHITECTURES.items() if named == arch), None)
  check_output_directory(os.path.abspath(out), overwrite)  # before the slow part
  state_dict, entry = read_torch_checkpoint(checkpoint, use_ema, trust_pickle)
  variables, num_classes = map_state_dict(arch, state_dict, num_classes, arch_label=arch_name or arch_spec)
  meta = make_meta(arch, arch_name, num_classes, f"authors' PyTorch checkpoint {os.path.abspath(checkpoint)} ({entry})")
  checkpoints.save_child(os.path.abspath(out), variables, meta)
  return meta


FLAGS = flags.FlagValues()
flags.DEFINE_string(
  'arch',
  None,
  f'One of {", ".join(space_lib.NAMED_ARCHITECTURES)}, a path to an architecture JSON file, or an architecture string.',
  flag_values=FLAGS,
)
flags.DEFINE_string('checkpoint', None, "The authors' .pth/.pth.tar file.", flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Output directory (Orbax variables + meta.json).', flag_values=FLAGS)
flags.DEFINE_integer('num_classes', None, 'Default: the classifier size in the file.', flag_values=FLAGS)
flags.DEFINE_bool('no_ema', False, "Take 'state_dict' even when 'state_dict_ema' exists.", flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'Replace the contents of a non-empty --out.', flag_values=FLAGS)
flags.DEFINE_bool(
  'trust_pickle', False, 'Load with full pickle (runs code from the file); only for files you trust.', flag_values=FLAGS
)
flags.mark_flags_as_required(['arch', 'checkpoint', 'out'], flag_values=FLAGS)


def main(argv: list[str]) -> int:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  if FLAGS.num_classes is not None and FLAGS.num_classes < 1:
    raise ConversionError('--num_classes must be positive')
  meta = convert(
    FLAGS.arch, FLAGS.checkpoint, FLAGS.out, FLAGS.num_classes, not FLAGS.no_ema, FLAGS.overwrite, FLAGS.trust_pickle
  )
  name = meta['arch_name'] or meta['arch']
  print(f'converted {name} ({meta["num_classes"]} classes) from {meta["source"]} to {os.path.abspath(FLAGS.out)}')
  return 0


if __name__ == '__main__':
  cli.run(main, FLAGS)
