"""Teacher: Flax EfficientNet against keras.applications, the converter CLI, checkpoint checks.

Keras models get random weights *and* random BatchNorm/Normalization statistics, so a wrongly
mapped variable shows; every comparison is max |flax - keras| / max |keras| < 1e-4.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import keras
from keras.src.utils import file_utils
import numpy as np
import pytest

from dna_jax import cli
from dna_jax import convert_teacher
from dna_jax import images as images_lib
from dna_jax import teacher
from dna_jax.models import efficientnet

RES = 64
TOL = 1e-4
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # Keras's numpy-2 __array__ notice
# keras.applications.EfficientNetB*(weights=None).count_params() (Keras 3.15): trainable weights,
# BN moving statistics and the Normalization layer's mean, variance and count.
KERAS_PARAM_COUNTS = {
  'b0': 5_330_571,
  'b1': 7_856_239,
  'b2': 9_177_569,
  'b3': 12_320_535,
  'b4': 19_466_823,
  'b5': 30_562_527,
  'b6': 43_265_143,
  'b7': 66_658_687,
}
B0_TAPS = {
  'stem': 'stem_activation',
  'stage1': 'block1a_project_bn',
  'block1': 'block2b_add',
  'block2': 'block3b_add',
  'block3': 'block4c_add',
  'block4': 'block5c_add',
  'block5': 'block6d_add',
  'block6': 'block7a_project_bn',
}


def keras_model(variant: str, resolution: int | None = RES, **kwargs) -> keras.Model:
  constructor = getattr(keras.applications, f'EfficientNet{variant.upper()}')
  shape = (resolution, resolution, 3) if resolution else None
  return constructor(weights=kwargs.pop('weights', None), input_shape=shape, classifier_activation=None, **kwargs)


def randomize(model: keras.Model, seed: int, imagenet_normalization: bool = False) -> None:
  """Random BN gamma/beta/moving stats, biases and input normalization (kernels keep Keras's init)."""
  rng = np.random.default_rng(seed)
  values = {
    'gamma': lambda s: rng.uniform(0.5, 1.5, s),
    'moving_variance': lambda s: rng.uniform(0.5, 2.0, s),
    'beta': lambda s: rng.normal(0, 0.1, s),
    'moving_mean': lambda s: rng.normal(0, 0.1, s),
    'bias': lambda s: rng.normal(0, 0.1, s),
    'mean': lambda s: rng.uniform(0.3, 0.6, s),
    'variance': lambda s: rng.uniform(0.03, 0.1, s),
  }
  if imagenet_normalization:  # what keras-applications' ImageNet files hold (std stored as variance)
    values['mean'] = lambda s: np.array(images_lib.IMAGENET_MEAN)
    values['variance'] = lambda s: np.array(images_lib.IMAGENET_STD)
  for layer in model.layers:
    for weight in layer.weights:
      if weight.name in values:
        weight.assign(values[weight.name](tuple(weight.shape)).astype(np.float32))
    if isinstance(layer, keras.layers.Normalization):
      layer.finalize_state()


def stage_taps(model: keras.Model) -> dict[str, str]:
  """Feature name -> last Keras layer of each stage, read from Keras's own layer names."""
  names = [layer.name for layer in model.layers]
  letters = {}
  for name in names:
    match = re.match(r'block(\d+)([a-z])_', name)
    if match:
      letters[int(match[1])] = max(letters.get(int(match[1]), 'a'), match[2])
  taps = {'stem': 'stem_activation'}
  for stage, letter in sorted(letters.items()):
    last = f'block{stage}{letter}_'
    taps['stage1' if stage == 1 else f'block{stage - 1}'] = last + ('add' if last + 'add' in names else 'project_bn')
  return taps


def keras_outputs(model: keras.Model, taps: dict[str, str], images: np.ndarray, training: bool = False):
  tapped = keras.Model(model.input, [model.output] + [model.get_layer(n).output for n in taps.values()])
  outs = [np.asarray(keras.ops.convert_to_numpy(t)) for t in tapped(images, training=training)]
  return outs[0], dict(zip(taps, outs[1:]))


def rel_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def images(n: int = 2, size: int = RES, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def keras_equivalent_count(variables) -> int:
  """What Keras's count_params() counts: params, BN statistics, normalization mean/variance and count."""
  count = sum(x.size for c in ('params', 'batch_stats') for x in jax.tree.leaves(variables[c]))
  return count + variables['normalization']['mean'].size + variables['normalization']['variance'].size + 1


@pytest.fixture(scope='module')
def b0(tmp_path_factory):
  """A random Keras B0, its saved weights, the converted checkpoint (CLI, verify on) and Keras outputs."""
  tmp = tmp_path_factory.mktemp('b0')
  model = keras_model('b0')
  randomize(model, seed=0)
  weights = str(tmp / 'b0.weights.h5')
  model.save_weights(weights)
  out = str(tmp / 'teacher')
  assert (
    cli.call(convert_teacher.main, convert_teacher.FLAGS, ['--variant', 'b0', '--keras_weights', weights, '--out', out])
    == 0
  )
  x = images()
  logits, features = keras_outputs(model, B0_TAPS, x)
  for layer in model.layers:  # training-mode reference: batch-statistics BN, no drop-connect/dropout
    if isinstance(layer, keras.layers.Dropout):
      layer.rate = 0.0
  _, train_features = keras_outputs(model, {'block1': 'block2b_add'}, x, training=True)
  return {
    'dir': out,
    'weights': weights,
    'images': x,
    'logits': logits,
    'features': features,
    'train_features': train_features,
  }


def test_b0_matches_keras(b0):
  model, variables = teacher.load(b0['dir'], 'b0')
  logits, features = jax.jit(lambda v, x: model.apply(v, x))(variables, b0['images'])
  assert rel_error(logits, b0['logits']) < TOL
  for name, want in b0['features'].items():
    assert features[name].shape == want.shape, name
    assert rel_error(features[name], want) < TOL, name
  with open(f'{b0["dir"]}/{teacher.METADATA_FILE}') as f:
    meta = json.load(f)
  assert (meta['variant'], meta['input'], meta['num_classes'], meta['imagenet_rescale']) == ('b0', 'raw', 1000, False)


def test_up_to_and_train_mode_bn(b0):
  model, variables = teacher.load(b0['dir'])
  for k in (1, 4):
    part = jax.jit(lambda v, x, k=k: teacher.teacher_features(model, v, x, up_to=k))(variables, b0['images'])
    assert set(part) == {'stem', 'stage1'} | {f'block{i}' for i in range(1, k + 1)}
    for name, value in part.items():
      assert rel_error(value, b0['features'][name]) < TOL, name
  train_mode = jax.jit(lambda v, x: teacher.teacher_features(model, v, x, up_to=1, train_mode_bn=True))
  train = train_mode(variables, b0['images'])
  assert rel_error(train['block1'], b0['train_features']['block1']) < TOL
  assert rel_error(train['block1'], b0['features']['block1']) > 1e-2
  shifted = {**variables, 'batch_stats': jax.tree.map(lambda s: s + 1.0, variables['batch_stats'])}
  again = train_mode(shifted, b0['images'])
  np.testing.assert_array_equal(again['block1'], train['block1'])  # running stats unused and not updated


def test_check_names_variant_and_first_mismatch(b0, tmp_path):
  assert teacher.check(b0['dir'], 'B0')['variant'] == 'b0'
  with pytest.raises(teacher.TeacherCheckpointError, match=r"holds EfficientNet variant 'b0', expected 'b7'"):
    teacher.check(b0['dir'], 'b7')
  with pytest.raises(teacher.TeacherCheckpointError, match=r"does not exist \(expected .*'b7'\).*convert_teacher"):
    teacher.check(str(tmp_path / 'missing'), 'b7')
  copy = tmp_path / 'copy'
  shutil.copytree(b0['dir'], copy)
  meta = json.loads((copy / teacher.METADATA_FILE).read_text())
  (copy / teacher.METADATA_FILE).write_text(json.dumps({**meta, 'variant': 'b1'}))
  with pytest.raises(teacher.TeacherCheckpointError, match=r"lacks params/stage1_layer1/\S+ .* of EfficientNet 'b1'"):
    teacher.check(str(copy), 'b1')
  (copy / teacher.METADATA_FILE).write_text(json.dumps({**meta, 'model': {**meta['model'], 'num_classes': 10}}))
  with pytest.raises(
    teacher.TeacherCheckpointError, match=r'params/head/classifier/bias has shape \(1000,\), .* needs \(10,\)'
  ):
    teacher.check(str(copy), 'b0')
  with pytest.raises(ValueError, match='valid: b0, b1'):
    teacher.check(b0['dir'], 'b9')


def test_converter_cli_errors(b0, tmp_path, capsys, monkeypatch):
  def offline(*args, **kwargs):
    raise Exception('URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -2] Name unknown')

  monkeypatch.setattr(file_utils, 'get_file', offline)
  cases = [
    (['--variant', 'b0', '--keras_weights', b0['weights'], '--out', b0['dir']], 'not empty; .* --overwrite'),
    (
      ['--variant', 'b0', '--out', str(tmp_path / 'a')],
      r'keras-applications/efficientnetb0\.h5 .* --keras_weights efficientnetb0\.h5',
    ),
    (
      ['--variant', 'b1', '--keras_weights', b0['weights'], '--out', str(tmp_path / 'b')],
      'cannot load .* EfficientNetB1',
    ),
    (['--variant', 'b0', '--keras_weights', str(tmp_path / 'none.h5'), '--out', str(tmp_path / 'c')], 'no such file'),
  ]
  for argv, message in cases:
    assert cli.call(convert_teacher.main, convert_teacher.FLAGS, argv) == 2
    err = capsys.readouterr().err
    assert re.search(f'error: .*{message}', err), err
    assert 'Traceback' not in err
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_imagenet_rescale_reproduces_keras(tmp_path, monkeypatch):
  """weights='imagenet' (download path) and the same file given locally both add Keras's extra rescale."""
  source = keras_model('b0', resolution=None)
  randomize(source, seed=3, imagenet_normalization=True)
  weights = str(tmp_path / 'efficientnetb0.weights.h5')
  source.save_weights(weights)
  monkeypatch.setattr(file_utils, 'get_file', lambda *args, **kwargs: weights)
  downloaded, local = str(tmp_path / 'downloaded'), str(tmp_path / 'local')
  assert (
    cli.call(convert_teacher.main, convert_teacher.FLAGS, ['--variant', 'b0', '--out', downloaded, '--noverify']) == 0
  )
  assert (
    cli.call(
      convert_teacher.main,
      convert_teacher.FLAGS,
      ['--variant', 'b0', '--keras_weights', weights, '--out', local, '--noverify'],
    )
    == 0
  )
  reference = keras_model('b0', resolution=None, weights='imagenet')  # Keras's own ImageNet graph
  assert any(isinstance(l, keras.layers.Rescaling) and np.size(l.scale) == 3 for l in reference.layers)
  x = images(1, 224)
  logits, features = keras_outputs(reference, {'block6': 'block7a_project_bn'}, x)
  model, variables = teacher.load(downloaded, 'b0')
  _, local_variables = teacher.load(local, 'b0')
  jax.tree.map(np.testing.assert_array_equal, variables, local_variables)
  np.testing.assert_allclose(variables['normalization']['rescale'], 1 / np.sqrt(images_lib.IMAGENET_STD), rtol=1e-6)
  got_logits, got = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  assert rel_error(got_logits, logits) < TOL
  assert rel_error(got['block6'], features['block6']) < TOL


def test_b7_matches_keras(tmp_path):
  model = keras_model('b7')
  assert model.count_params() == KERAS_PARAM_COUNTS['b7']
  randomize(model, seed=7)
  weights = str(tmp_path / 'b7.weights.h5')
  model.save_weights(weights)
  out = str(tmp_path / 'teacher')
  assert (
    cli.call(
      convert_teacher.main,
      convert_teacher.FLAGS,
      ['--variant', 'b7', '--keras_weights', weights, '--out', out, '--noverify'],
    )
    == 0
  )
  x = images()
  taps = stage_taps(model)
  assert taps['block6'] == 'block7d_add' and taps['block1'] == 'block2g_add'  # depth 3.1: ceil(3.1 * 2) = 7
  logits, features = keras_outputs(model, taps, x)
  del model
  flax_model, variables = teacher.load(out, 'b7')
  assert keras_equivalent_count(variables) == KERAS_PARAM_COUNTS['b7']
  got_logits, got = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, x)
  assert rel_error(got_logits, logits) < TOL
  for name, want in features.items():
    assert got[name].shape == want.shape, name
    assert rel_error(got[name], want) < TOL, name
  assert tuple(got[f'block{k}'].shape[-1] for k in range(1, 7)) == (48, 80, 160, 224, 384, 640)


def test_param_counts_equal_keras():
  for variant in ('b0', 'b3'):
    assert keras_model(variant).count_params() == KERAS_PARAM_COUNTS[variant]
  for variant, count in KERAS_PARAM_COUNTS.items():
    variables = teacher.abstract_variables(efficientnet.variant(variant))
    assert keras_equivalent_count(variables) == count, variant
  b7 = efficientnet.EfficientNetB7()
  assert efficientnet.block_widths(b7) == (48, 80, 160, 224, 384, 640)
  assert efficientnet.block_strides(b7) == (2, 2, 2, 1, 2, 1)
  assert efficientnet.block_widths(efficientnet.EfficientNetB0()) == (24, 40, 80, 112, 192, 320)


def test_tiny_features_up_to_pmap_and_no_gradient():
  model = efficientnet.EfficientNetTiny()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert 'normalization' not in variables
  logits, features = jax.jit(model.apply)(variables, x)
  assert logits.shape == (4, 10)
  assert {k: v.shape[1:] for k, v in features.items() if k != 'pre_logits'} == {
    'stem': (32, 32, 16),
    'stage1': (32, 32, 8),
    'block1': (16, 16, 16),
    'block2': (8, 8, 24),
    'block3': (8, 8, 32),
  }
  assert (efficientnet.block_widths(model), efficientnet.block_strides(model)) == ((16, 24, 32), (2, 2, 1))
  part_logits, part = jax.jit(model.clone(up_to=2).apply)(variables, x)
  assert part_logits is None and set(part) == {'stem', 'stage1', 'block1', 'block2'}
  np.testing.assert_allclose(part['block2'], features['block2'], rtol=1e-6, atol=1e-6)
  per_device = jax.pmap(lambda v, x: teacher.teacher_features(model, v, x, up_to=3), in_axes=(None, 0))(
    variables, x.reshape(2, 2, 32, 32, 3)
  )
  np.testing.assert_allclose(per_device['block3'].reshape(4, 8, 8, 32), features['block3'], rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda v: jnp.sum(teacher.teacher_features(model, v, x)['block3'] ** 2)))(variables)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match=r'up_to must be None or a DNA block in 1\.\.3'):
    model.clone(up_to=4).apply(variables, x)
  with pytest.raises(ValueError, match='NHWC'):
    model.apply(variables, x[0])
  with pytest.raises(ValueError, match='unknown EfficientNet variant'):
    efficientnet.variant('b8')


def test_tiny_deep_has_the_tiny_blocks_with_3_3_2_layers(tmp_path):
  """The deeper demo teacher: same block widths, strides and feature shapes as 'tiny', deeper blocks."""
  tiny, deep = efficientnet.variant('tiny'), efficientnet.variant('tiny_deep')
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(deep.init, jax.random.key(0), x)['params']
  layers_per_stage = [sum(name.startswith(f'stage{i}_layer') for name in params) for i in range(1, 5)]
  assert layers_per_stage == [1, 3, 3, 2]
  assert efficientnet.block_widths(deep) == efficientnet.block_widths(tiny)
  assert efficientnet.block_strides(deep) == efficientnet.block_strides(tiny)
  shapes = [
    jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init_with_output, jax.random.key(0), x)[0]) for m in (tiny, deep)
  ]
  assert shapes[0] == shapes[1]
  # A missing teacher of a variant without Keras weights points to the teacher stage, not the converter.
  with pytest.raises(teacher.TeacherCheckpointError, match=r'train it with the teacher stage'):
    teacher.read_metadata(tmp_path / 'missing', 'tiny_deep')
  with pytest.raises(teacher.TeacherCheckpointError, match=r'convert_teacher --variant b0'):
    teacher.read_metadata(tmp_path / 'missing', 'b0')
