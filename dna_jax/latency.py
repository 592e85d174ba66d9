"""Latency tables for a target device: every candidate op at every layer shape of a space, measured.

  python -m dna_jax.latency --space configs/imagenet_b7.py --target tflite_cpu --out DIR [--threads 1]
  python -m dna_jax.latency --space WORKDIR --target jax --out DIR
  python -m dna_jax.latency --check DIR --space CONFIG_OR_WORKDIR --nets dna_a,dna_b,random:10

Measuring: every piece a net of the space can contain (latency_table.space_keys: each op at each input
width, stride and resolution, the stem + DS block, the head) is built alone with random weights and
timed on this machine: as a TFLite graph in the TFLite interpreter (`tflite_cpu`, `--threads`), or as a
jitted JAX function on the local accelerator or CPU (`jax`); `--warmup` untimed runs, then the median of
`--repeats` timed runs, the 10th and 90th percentiles recorded as the spread. Then `--fit_nets` whole
nets are timed the same way and the median of (measured - sum of pieces) becomes the table's per-net
offset. The table (latency.csv + latency.json, latency_table.py) can be measured on a phone-like device
and copied back.

Checking (`--check`): whole nets are exported, timed and compared with the table's prediction; prints
the errors and Kendall tau between predicted latency, FLOPs and measured latency.
`--space` is a config file (its space, data.image_size, space.stem_stride; --num_classes) or a rated
workdir (its ratings/meta.json).
"""

from __future__ import annotations

from collections.abc import Callable
import datetime
import json
import os
import platform
import re
import time
from typing import Any

from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import cli
from dna_jax import costs
from dna_jax import files
from dna_jax import latency_table
from dna_jax import rank_stats
from dna_jax import ratings as ratings_lib
from dna_jax import space as space_lib
from dna_jax.models import child
from dna_jax.models import layers
from dna_jax.stages import export

TARGETS = ('tflite_cpu', 'jax')
NATIVE = layers.Conventions(depthwise='native')  # grouped convolutions: what TFLite and accelerators run


class Piece(nn.Module):
  """One piece of a child net alone: an op, the stem + DS block, or the head (returns (output, None))."""

  key: latency_table.Key

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, None]:
    piece, _, out, hidden, kernel, stride, _ = self.key
    if piece == 'mbconv':
      return layers.MBConv(out, hidden, kernel, stride, conventions=NATIVE)(x, train), None
    if piece == 'stem':
      x = layers.Stem(hidden, stride, NATIVE)(x, train)
      return layers.MBConv(out, 1, 3, 1, conventions=NATIVE)(x, train), None
    return layers.Head(out, hidden, conventions=NATIVE)(x, train)[0], None


def input_shape(key: latency_table.Key) -> tuple[int, int, int, int]:
  _, cin, _, _, _, _, size = key
  return (1, size, size, cin)


def timed(run: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float, float, int]:
  """(median, p10, p90) milliseconds of `run` after `warmup` untimed calls, and the repeat count."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(1000 * (time.perf_counter() - start))
  p10, median, p90 = np.percentile(times, [10, 50, 90])
  return float(median), float(p10), float(p90), repeats


def measure(model: Any, variables: Any, shape: tuple[int, ...], target: str, threads: int, warmup: int, repeats: int):
  """Times one model (inference mode) on one input of `shape` on the target."""
  predict = export.inference_fn(model, variables)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  if target == 'jax':
    compiled = jax.jit(predict)
    device_x = jax.device_put(x)
    return timed(lambda: jax.block_until_ready(compiled(device_x)), warmup, repeats)
  import tensorflow as tf  # only the TFLite target needs TensorFlow

  interpreter = tf.lite.Interpreter(model_content=export.tflite_bytes(predict, shape), num_threads=threads)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], x)
  return timed(interpreter.invoke, warmup, repeats)


def _init(model: Any, shape: tuple[int, ...]) -> Any:
  return jax.jit(lambda r: model.init(r, jnp.zeros(shape), train=False))(jax.random.PRNGKey(0))


def measure_piece(key: latency_table.Key, target: str, threads: int, warmup: int, repeats: int):
  model = Piece(key)
  return measure(model, _init(model, input_shape(key)), input_shape(key), target, threads, warmup, repeats)


def measure_net(
  arch: space_lib.Architecture, resolution: int, num_classes: int, stem_stride: int, target, threads, warmup, repeats
):
  model = child.ChildNet(arch, num_classes, 0.0, 0.0, stem_stride, NATIVE)
  shape = (1, resolution, resolution, 3)
  return measure(model, _init(model, shape), shape, target, threads, warmup, repeats)[0]


# ----------------------------------------------------------------------------- what to measure


def load_space(spec: str, num_classes: int) -> tuple[space_lib.SearchSpace, int, int, int]:
  """(space, resolution, num_classes, stem_stride) of a rated workdir or a config file[:arg]."""
  meta = os.path.join(spec, 'ratings', ratings_lib.META)
  if os.path.isdir(spec):
    if not os.path.exists(meta):
      raise ValueError(f'{spec} is a directory without {meta}: give a rated workdir or a config file')
    data = files.read_json(meta)
    space = space_lib.SearchSpace.from_dict(data['space'])
    return space, int(data['resolution']), int(data['num_classes']), int(data['stem_stride'])
  cli.check_config_file(['--config', spec])
  path, _, arg = spec.partition(':')
  config = cli.load_config(path, arg or None)
  return space_lib.space_from_config(config.space), config.data.image_size, num_classes, config.space.stem_stride


def nets_to_check(spec: str, space: space_lib.SearchSpace, seed: int) -> list[tuple[str, space_lib.Architecture]]:
  """'dna_a,efficientnet_b0,random:10' -> named nets (any space) and random nets of `space`.

  Architecture strings may be given too: the commas of their stem widths ('16,8,128|...') do not
  separate nets.
  """
  parts: list[str] = []
  for piece in (p.strip() for p in spec.split(',') if p.strip()):
    if parts and re.fullmatch(r'[0-9,]+', parts[-1]):  # widths of an architecture string so far
      parts[-1] += ',' + piece
    else:
      parts.append(piece)
  nets = []
  rng = np.random.default_rng(seed)
  for part in parts:
    if part.startswith('random:'):
      for i in range(int(part.split(':')[1])):
        choices = []
        for block in space.blocks:
          c = int(rng.integers(len(block.cells)))
          choices.append((c, tuple(int(rng.choice(block.cells[c].layer_ops(l))) for l in range(block.cells[c].layers))))
        nets.append((f'random_{i}', space_lib.make_architecture(space, choices)))
    else:
      nets.append((part, space_lib.load_architecture(part)))
  return nets


# ----------------------------------------------------------------------------- the two commands


def build_table(
  spec: str, target: str, out: str, threads: int, warmup: int, repeats: int, fit_nets: str, num_classes: int
) -> latency_table.LatencyTable:
  """Measures every piece of the space, fits the per-net offset on `fit_nets`, writes the table to `out`."""
  space, resolution, num_classes, stem_stride = load_space(spec, num_classes)
  keys = latency_table.space_keys(space, resolution, num_classes, stem_stride)
  logging.info('Measuring %d pieces of %s at %d px on %s.', len(keys), spec, resolution, target)
  start, entries = time.time(), {}
  for i, key in enumerate(keys, 1):
    entries[key] = measure_piece(key, target, threads, warmup, repeats)
    eta = (time.time() - start) / i * (len(keys) - i)
    logging.info('%d/%d %s: %.3f ms (ETA %.0f s)', i, len(keys), key, entries[key][0], eta)
  meta = {
    'target': target,
    'device': str(jax.devices()[0]) if target == 'jax' else cpu_name(),
    'cpu': platform.platform(),
    'threads': threads,
    'warmup': warmup,
    'repeats': repeats,
    'versions': {'jax': jax.__version__, 'tensorflow': _tf_version(), 'numpy': np.__version__},
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'space': space.to_dict(),
    'resolution': resolution,
    'num_classes': num_classes,
    'stem_stride': stem_stride,
    'offset_ms': 0.0,
    'measure_seconds': round(time.time() - start, 1),
  }
  table = latency_table.LatencyTable(entries, meta)
  residuals = []
  for name, arch in nets_to_check(fit_nets, space, seed=0):
    measured = measure_net(arch, resolution, num_classes, stem_stride, target, threads, warmup, repeats)
    residuals.append(measured - latency_table.predict_ms(table, arch, resolution, num_classes, stem_stride))
    logging.info('offset fit on %s: measured %.3f ms, residual %.3f ms', name, measured, residuals[-1])
  meta['offset_ms'] = float(np.median(residuals)) if residuals else 0.0
  meta['offset_fit_nets'] = fit_nets
  os.makedirs(out, exist_ok=True)
  latency_table.write(out, entries, meta)
  return latency_table.read(out)


def check_table(directory: str, spec: str, nets: str, num_classes: int, seed: int = 1) -> dict[str, Any]:
  """Predicted against measured latency of whole nets, timed as the table was measured."""
  table = latency_table.read(directory)
  meta = table.meta
  space, resolution, num_classes, stem_stride = load_space(spec, num_classes)
  rows = []
  for name, arch in nets_to_check(nets, space, seed):
    predicted = latency_table.predict_ms(table, arch, resolution, num_classes, stem_stride)
    measured = measure_net(
      arch, resolution, num_classes, stem_stride, meta['target'], meta['threads'], meta['warmup'], meta['repeats']
    )
    flops = costs.architecture_cost(arch, resolution, num_classes, stem_stride)[0].flops
    rows.append(
      {
        'net': name,
        'arch': str(arch),
        'flops': flops,
        'predicted_ms': predicted,
        'measured_ms': measured,
        'error': (predicted - measured) / measured,
      }
    )
  errors = np.abs([r['error'] for r in rows])
  measured, predicted = [r['measured_ms'] for r in rows], [r['predicted_ms'] for r in rows]
  return {
    'nets': rows,
    'median_abs_error': float(np.median(errors)),
    'max_abs_error': float(np.max(errors)),
    'tau_predicted_measured': float(rank_stats.kendall_tau(predicted, measured)),
    'tau_flops_measured': float(rank_stats.kendall_tau([r['flops'] for r in rows], measured)),
  }


def cpu_name() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f'{line.split(":", 1)[1].strip()} ({os.cpu_count()} cores)'
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _tf_version() -> str:
  try:
    import tensorflow as tf

    return tf.__version__
  except ImportError:
    return 'not installed'


FLAGS = flags.FlagValues()
flags.DEFINE_string('space', None, 'A config file (configs/NAME.py[:arg]) or a rated workdir.', flag_values=FLAGS)
flags.DEFINE_enum('target', 'tflite_cpu', TARGETS, 'What to time on this machine.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Directory of the table to write.', flag_values=FLAGS)
flags.DEFINE_string('check', None, 'Check the table in this directory against whole nets instead.', flag_values=FLAGS)
flags.DEFINE_string(
  'nets', 'random:10', "Nets to check: names, JSON/strings, 'random:N' (of --space).", flag_values=FLAGS
)
flags.DEFINE_string('fit_nets', 'random:5', 'Nets whose measured latency fits the per-net offset.', flag_values=FLAGS)
flags.DEFINE_integer('threads', 1, 'TFLite interpreter threads.', flag_values=FLAGS)
flags.DEFINE_integer('warmup', 5, 'Untimed runs before timing.', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 30, 'Timed runs (the median is kept).', flag_values=FLAGS)
flags.DEFINE_integer(
  'num_classes', 1000, 'Classes (a config gives no dataset size; a workdir does).', flag_values=FLAGS
)
flags.mark_flag_as_required('space', flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if argv:
    raise ValueError(f'unexpected arguments: {" ".join(argv)}')
  if FLAGS.check:
    print(json.dumps(check_table(FLAGS.check, FLAGS.space, FLAGS.nets, FLAGS.num_classes), indent=1))
    return
  if not FLAGS.out:
    raise ValueError('give --out DIR (the table to write) or --check DIR (a table to check)')
  if os.path.exists(os.path.join(FLAGS.out, latency_table.TABLE)):
    raise ValueError(f'{FLAGS.out} already holds a latency table; choose another --out')
  table = build_table(
    FLAGS.space, FLAGS.target, FLAGS.out, FLAGS.threads, FLAGS.warmup, FLAGS.repeats, FLAGS.fit_nets, FLAGS.num_classes
  )
  print(
    f'Wrote {len(table.entries)} pieces to {FLAGS.out} in {table.meta["measure_seconds"]:.0f} s; '
    f'offset {table.offset_ms:.3f} ms per net.'
  )


if __name__ == '__main__':
  cli.run(main, FLAGS)
