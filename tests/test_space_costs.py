"""Search space data, architecture formats, the analytic cost model against the real model, describe."""

import json
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import costs
from dna_jax import describe
from dna_jax import parallel
from dna_jax import space as space_lib
from dna_jax.models import child
from dna_jax.models import layers


def flax_param_count(arch, num_classes=1000, size=64):
  model = child.ChildNet(arch, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def random_architecture(space, rng):
  choices = []
  for block in space.blocks:
    c = rng.randrange(len(block.cells))
    choices.append((c, tuple(rng.randrange(6) for _ in range(block.cells[c].layers))))
  return space_lib.make_architecture(space, choices)


def test_ops_in_dna_order():
  assert space_lib.OP_NAMES == ('k3e6', 'k5e6', 'k7e6', 'k3e3', 'k5e3', 'k7e3')
  assert space_lib.ops_string((0, 4, 4)) == 'k3e6-k5e3-k5e3'
  assert space_lib.parse_ops('k7e3-k3e6') == (5, 0)
  with pytest.raises(ValueError, match='valid ops'):
    space_lib.op_index('k9e6')


def test_default_space_size_and_paths():
  space = space_lib.default_imagenet_space()
  assert [len(b.cells) for b in space.blocks] == [2, 3, 3, 3, 3, 1]
  assert [b.teacher_width for b in space.blocks] == [48, 80, 160, 224, 384, 640]
  # Block 6 pinned to k3e6 (the authors' search): one path.
  assert space.blocks[-1].cells[0].name == '1@320=k3e6' and space.blocks[-1].num_paths == 1
  assert sum(b.num_paths for b in space.blocks) == 23005
  blocks_1_to_5 = (36 + 216) * (36 + 216 + 1296) * (36 + 216 + 1296) * (216 + 2 * 1296) * (1296 + 2 * 7776)
  assert space.num_architectures == blocks_1_to_5 == 28568531087695872
  free = space_lib.parse_space('imagenet_free6')
  assert sum(b.num_paths for b in free.blocks) == 23010 and free.num_architectures == 6 * blocks_1_to_5
  paths = list(space.blocks[0].cells[0].paths())
  assert len(paths) == 36 and paths[0] == (0, 0) and paths[7] == (1, 1) and paths[-1] == (5, 5)


def test_named_architectures_lie_in_the_default_space():
  space = space_lib.default_imagenet_space()
  for name, arch in space_lib.NAMED_ARCHITECTURES.items():
    assert space_lib.locate(space, arch) is not None, name
  assert space_lib.locate(space, space_lib.NAMED_ARCHITECTURES['dna_a']) == (1, 2, 2, 1, 1, 0)
  # block 6 with another op lies only in the space that searches block 6
  other = space_lib.from_string(str(space_lib.NAMED_ARCHITECTURES['dna_a']).replace('320s1:k3e6', '320s1:k5e6'))
  assert space_lib.locate(space, other) is None
  assert space_lib.locate(space_lib.parse_space('imagenet_free6'), other) == (1, 2, 2, 1, 1, 0)


def test_pinned_ops_parse_round_trip_and_restrict_the_paths():
  space = space_lib.parse_space('2 16 3@8=*-k5e3-*,1@12=k3e6; 1 24 2@12')
  cell, fixed = space.blocks[0].cells
  assert cell.name == '3@8=*-k5e3-*' and cell.num_paths == 36 and fixed.num_paths == 1
  assert all(ops[1] == space_lib.op_index('k5e3') for ops in cell.paths())
  assert [cell.path_index(ops) for ops in cell.paths()] == list(range(36))
  assert space_lib.SearchSpace.from_dict(space.to_dict()) == space
  arch = space_lib.make_architecture(space, [(0, (2, 4, 5)), (0, (0, 1))])
  assert arch.blocks[0].cell == space_lib.Cell(3, 8, 2) and space_lib.locate(space, arch) == (0, 0)
  assert space_lib.locate(space, space_lib.make_architecture(space, [(0, (2, 3, 5)), (0, (0, 1))])) is None
  # a space without pins keeps the record it always had (ratings meta.json, workdir identity)
  assert 'pinned' not in space_lib.parse_space('2 16 1@8').to_dict()['blocks'][0]['cells'][0]
  with pytest.raises(ValueError, match='one op for every layer'):
    space_lib.parse_space('2 16 3@8=k3e6-k5e6')


def test_architecture_round_trips_through_json_and_string():
  rng = random.Random(0)
  space = space_lib.default_imagenet_space()
  for arch in list(space_lib.NAMED_ARCHITECTURES.values()) + [random_architecture(space, rng) for _ in range(5)]:
    assert space_lib.Architecture.from_json(arch.to_json()) == arch
    assert space_lib.from_string(str(arch)) == arch
  small = space_lib.parse_space('2 16 1@8', stem_width=8, ds_width=4, head_width=32)
  arch = space_lib.make_architecture(small, [(0, (3,))])
  assert str(arch) == '8,4,32|8s2:k3e3' and space_lib.from_string(str(arch)) == arch


def test_parse_space_errors_name_the_block():
  with pytest.raises(ValueError, match='space block 2'):
    space_lib.parse_space('2 16 1@8; 2 24 3x12')
  with pytest.raises(ValueError, match='share the stride'):
    space_lib.Block((space_lib.Cell(1, 8, 1), space_lib.Cell(1, 8, 2)), 16)


def test_malformed_architecture_json_names_the_field():
  with pytest.raises(ValueError, match=r"blocks\[1\]: missing field 'stride'"):
    space_lib.Architecture.from_dict({'blocks': [{'width': 8, 'stride': 1, 'ops': ['k3e6']}, {'width': 8}]})
  with pytest.raises(ValueError, match=r'blocks\[0\]: unknown op'):
    space_lib.Architecture.from_dict({'blocks': [{'width': 8, 'stride': 1, 'ops': ['k4e6']}]})


@pytest.mark.parametrize('name', sorted(space_lib.NAMED_ARCHITECTURES))
def test_param_count_of_named_nets_equals_the_flax_model(name):
  arch = space_lib.NAMED_ARCHITECTURES[name]
  total, per_block = costs.architecture_cost(arch)
  assert total.params == flax_param_count(arch)
  assert len(per_block) == 6


def test_known_counts():
  # EfficientNet-B0 with DNA's fixed parts is timm's efficientnet_b0: 5,288,548 parameters.
  b0, _ = costs.architecture_cost(space_lib.NAMED_ARCHITECTURES['efficientnet_b0'])
  assert b0.params == 5288548
  a, _ = costs.architecture_cost(space_lib.NAMED_ARCHITECTURES['dna_a'])
  assert a.flops <= 350e6 < b0.flops and b0.flops <= 399.4e6


def test_param_count_of_random_architectures_and_spaces():
  rng = random.Random(1)
  space = space_lib.default_imagenet_space()
  for _ in range(4):
    arch = random_architecture(space, rng)
    assert costs.architecture_cost(arch, num_classes=10)[0].params == flax_param_count(arch, 10)
  small = space_lib.parse_space('1 16 1@8,2@12; 2 24 2@12,3@16', stem_width=16, ds_width=8, head_width=64)
  for _ in range(4):
    arch = random_architecture(small, rng)
    assert costs.architecture_cost(arch, 32, 10)[0].params == flax_param_count(arch, 10, 32)


def test_costs_are_additive_per_block():
  rng = random.Random(2)
  space = space_lib.default_imagenet_space()
  for _ in range(5):
    arch = random_architecture(space, rng)
    total, per_block = costs.architecture_cost(arch)
    fixed = costs.fixed_cost(32, 16, 1280, 224, space_lib.final_size(arch, 224), 1000)
    assert total == sum(per_block, fixed)
    sizes = space_lib.block_sizes(space, 224)
    assert sizes == [112, 56, 28, 14, 14, 7]
    widths = [16] + [b.cell.width for b in arch.blocks]
    for k, choice in enumerate(arch.blocks):
      head = 1280 if k == 5 else None
      assert costs.cell_cost(choice.cell, choice.ops, widths[k], sizes[k], head) == per_block[k]


@pytest.mark.parametrize('name', ['efficientnet_b0', 'dna_d'])
def test_macs_agree_with_xla_cost_analysis(name):
  """XLA counts 2 FLOPs per multiply-accumulate plus every elementwise op (BN, swish, SE gating, adds).

  The analytic MAC count must be at least half of XLA's and within 10% of it.
  """
  arch = space_lib.NAMED_ARCHITECTURES[name]
  model = child.ChildNet(arch, 1000, conventions=layers.Conventions(depthwise='native'))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  compiled = (
    jax.jit(lambda v, x: model.apply(v, x)[0])
    .lower(shapes, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    .compile()
  )
  xla_flops = compiled.cost_analysis()['flops']
  macs = costs.architecture_cost(arch)[0].macs
  assert 1.0 <= xla_flops / (2 * macs) <= 1.10


def test_describe_reports_model_costs():
  info = describe.describe(space_lib.NAMED_ARCHITECTURES['dna_c'], 224, 1000)
  total, _ = costs.architecture_cost(space_lib.NAMED_ARCHITECTURES['dna_c'])
  assert info['params'] == total.params == 5273896
  assert info['flops'] == total.flops
  assert [row['resolution'] for row in info['blocks']] == [112, 56, 28, 14, 14, 7]
  assert sum(row['params'] for row in info['blocks']) + info['fixed']['params'] == info['params']


def run_describe(*args):
  return subprocess.run([sys.executable, '-m', 'dna_jax.describe', *args], capture_output=True, text=True, timeout=120)


def test_describe_cli(tmp_path):
  out = run_describe('dna_b', '--json')
  assert out.returncode == 0, out.stderr
  data = json.loads(out.stdout)
  assert isinstance(data['params'], int) and isinstance(data['flops'], int)
  assert data['params'] == flax_param_count(space_lib.NAMED_ARCHITECTURES['dna_b'])
  small = run_describe('dna_b', '--json', '--resolution', '192', '--num_classes', '10')
  assert json.loads(small.stdout)['flops'] < data['flops']
  path = tmp_path / 'arch.json'
  path.write_text(space_lib.NAMED_ARCHITECTURES['dna_a'].to_json())
  table = run_describe(str(path))
  assert table.returncode == 0 and '4,243,318 params' in table.stdout
  bad = run_describe('dna_z')
  assert bad.returncode != 0 and 'dna_a' in bad.stderr and 'Traceback' not in bad.stderr
  path.write_text('{"blocks": [{"width": 8, "ops": ["k3e6"]}]}')
  bad = run_describe(str(path))
  assert bad.returncode != 0 and "missing field 'stride'" in bad.stderr and 'Traceback' not in bad.stderr
  path.write_text('{not json')
  bad = run_describe(str(path))
  assert bad.returncode != 0 and 'not valid JSON' in bad.stderr and 'Traceback' not in bad.stderr


def test_depthwise_implementations_agree():
  """Shift-and-add (and its hand-written gradient) against XLA's grouped convolution."""
  rng = np.random.default_rng(0)
  for size, kernel, stride, padding in [
    (9, 3, 2, 'tf_same'),
    (8, 5, 2, 'tf_same'),
    (6, 7, 2, 'tf_same'),
    (8, 7, 1, 'symmetric'),
    (7, 5, 2, 'symmetric'),
    (10, 3, 1, 'tf_same'),
  ]:
    x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
    native = layers.depthwise_conv(x, w, stride, padding, 'native')
    shifted = layers.depthwise_conv(x, w, stride, padding, 'shift_add')
    out = space_lib.output_size(size, kernel, stride, padding)
    assert native.shape == shifted.shape == (2, out, out, 6)
    np.testing.assert_allclose(native, shifted, rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=native.shape), jnp.float32)  # a loss whose gradient varies by position
    (gx1, gw1), (gx2, gw2) = (
      jax.grad(
        lambda x, w, i=impl, s=stride, p=padding, c=weights: jnp.sum(
          jnp.tanh(layers.depthwise_conv(x, w, s, p, i)) * c
        ),
        (0, 1),
      )(x, w)
      for impl in ('native', 'shift_add')
    )
    np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(gx1))) > 0.1 and float(jnp.max(jnp.abs(gw1))) > 0.1


def test_hand_written_depthwise_gradient_equals_autodiff():
  """layers.shift_add_vjp against JAX's gradient of the same forward, at every kernel and stride."""
  rng = np.random.default_rng(1)
  for kernel, stride, (pad_low, pad_high) in [
    (3, 1, (1, 1)),
    (5, 1, (1, 3)),
    (7, 1, (3, 3)),
    (5, 2, (1, 2)),
    (7, 2, (2, 4)),
  ]:
    padded = jnp.asarray(rng.normal(size=(2, 9 + pad_low + pad_high, 9 + pad_low + pad_high, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
    out = (padded.shape[1] - kernel) // stride + 1
    weights = jnp.asarray(rng.normal(size=(2, out, out, 4)), jnp.float32)

    def loss(p, w, conv, stride=stride, size=(out, out), weights=weights):
      return jnp.sum(jnp.tanh(conv(p, w, stride, size)) * weights)

    grads = [jax.grad(loss, (0, 1))(padded, w, conv) for conv in (layers.shift_add, layers.shift_add_vjp)]
    for autodiff, hand in zip(*grads):
      np.testing.assert_allclose(hand, autodiff, rtol=1e-5, atol=1e-5)


def test_kernel_gradient_summed_a_few_examples_at_a_time_equals_autodiff(monkeypatch):
  """layers.tap_sums over chunks of examples (a scan) gives the whole batch's kernel gradient."""
  rng = np.random.default_rng(2)
  batch, channels = 6, 4
  for kernel, stride, size in [(3, 1, 10), (5, 2, 11), (7, 1, 12)]:
    padded = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, channels)), jnp.float32)
    out = (size - kernel) // stride + 1
    weights = jnp.asarray(rng.normal(size=(batch, out, out, channels)), jnp.float32)

    def kernel_grad(conv, p=padded, w=w, stride=stride, out=out, weights=weights):
      loss = lambda w: jnp.sum(jnp.tanh(conv(p, w, stride, (out, out))) * weights)
      return jax.jit(jax.grad(loss))(w)

    autodiff = kernel_grad(layers.shift_add)
    example_bytes = out * out * channels * 4
    # 1 and 2 examples per chunk divide the batch; 4 does not, so chunks of 3; then the whole batch.
    for examples in (1, 2, 4, batch):
      monkeypatch.setattr(layers, 'TAP_SUM_CHUNK_BYTES', examples * example_bytes)
      np.testing.assert_allclose(kernel_grad(layers.shift_add_vjp), autodiff, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(autodiff))) > 1.0


def test_kernel_gradient_in_chunks_under_shard_map(monkeypatch):
  """Per-device kernel gradients (varying over the data axis) summed in chunks, then over devices."""
  rng = np.random.default_rng(3)
  devices, per_device, size, channels = jax.device_count(), 4, 8, 3
  padded = jnp.asarray(rng.normal(size=(devices * per_device, size, size, channels)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 1, channels)), jnp.float32)

  def kernel_grad(conv):
    def per_device_grad(p, w):
      loss = lambda w: jnp.sum(jnp.tanh(conv(p, w, 1, (size - 2, size - 2))))
      return jax.lax.psum(jax.grad(loss)(parallel.varying(w)), parallel.AXIS)

    mesh, spec = parallel.make_mesh(), jax.sharding.PartitionSpec
    sharded = jax.shard_map(per_device_grad, mesh=mesh, in_specs=(spec(parallel.AXIS), spec()), out_specs=spec())
    put = lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s))
    return jax.jit(sharded)(put(padded, spec(parallel.AXIS)), put(w, spec()))

  monkeypatch.setattr(layers, 'TAP_SUM_CHUNK_BYTES', (size - 2) ** 2 * channels * 4)  # one example per chunk
  np.testing.assert_allclose(kernel_grad(layers.shift_add_vjp), kernel_grad(layers.shift_add), rtol=1e-5, atol=1e-5)


def test_supernet_cell_macs_match_the_child_costs():
  cell = space_lib.Cell(layers=3, width=24, stride=2)
  in_channels, size = 16, 32
  shapes = [(in_channels if l == 0 else 24, 24, 2 if l == 0 else 1) for l in range(3)]
  stem_macs, per_layer = costs.supernet_cell_macs(shapes, size)
  assert stem_macs == 0 and [len(ops) for ops in per_layer] == [space_lib.NUM_OPS] * 3
  for ops in [(0, 0, 0), (5, 2, 3), (1, 4, 5)]:
    expected = costs.cell_cost(cell, ops, in_channels, size).macs
    assert sum(per_layer[l][op] for l, op in enumerate(ops)) == expected
  stem_macs, _ = costs.supernet_cell_macs(shapes, size, stem=(16, 8, 1))
  assert stem_macs == costs.fixed_cost(16, 8, 8, size, 1, 1, stem_stride=1).macs - 8 * 1


def test_pointwise_is_one_2d_matmul_on_cpu_with_dense_values_and_gradients():
  """layers.channels_matmul: the rows flattened into one 2-D matmul, equal to Dense's own contraction."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 5, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
  numbers = (((3,), (0,)), ((), ()))
  weights = jnp.asarray(rng.normal(size=(3, 5, 6, 7)), jnp.float32)

  def value_and_grads(dot):
    loss = lambda x, k: jnp.sum(jnp.tanh(dot(x, k, numbers)) * weights)
    return jax.value_and_grad(loss, (0, 1))(x, kernel)

  (ours, our_grads), (dense, dense_grads) = (value_and_grads(d) for d in (layers.channels_matmul, jax.lax.dot_general))
  np.testing.assert_allclose(ours, dense, rtol=1e-5)
  for a, b in zip(our_grads, dense_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(lambda x, k: layers.channels_matmul(x, k, numbers))(x, kernel)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  assert [d.invars[0].aval.shape for d in dots] == [(90, 4)]
  # In a model: the same variables as a plain Dense layer.
  variables = layers.pointwise(7, 'conv', layers.KERAS).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'kernel': (4, 7)}}
