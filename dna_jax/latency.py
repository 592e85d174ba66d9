"""Latency tables for a target device: every candidate op at every layer shape of a space, measured.

  python -m dna_jax.latency --space configs/imagenet_b7.py --target tflite_cpu --out DIR [--threads 1]
  python -m dna_jax.latency --space WORKDIR --target jax --out DIR
  python -m dna_jax.latency --check DIR --space CONFIG_OR_WORKDIR --nets dna_a,dna_b,random:10

Measuring: every piece a net of the space can contain (latency_table.space_keys: each op at each input
width, stride and resolution, the stem + DS block, the head) is built alone with random weights and
timed on this machine: as a TFLite graph in the TFLite interpreter (`tflite_cpu`, `--threads`), or as a
jitted JAX function on the local accelerator or CPU (`jax`). All pieces are exported first, then timed
together: `--warmup` untimed runs each, then `--rounds` rounds, each running every piece in turn at least
`--repeats` times and `--min_round_ms`. A piece's time is the smallest of its round medians, its 10th and
90th percentiles over all runs the spread: on a shared machine a slow spell (another process on the
cores, seconds long; measured: timed one by one, 3 of 10 whole nets came out 1.7-1.9x slow) then
falls in some rounds of a piece, not in all, and no export runs beside the timing. Then `--fit_nets`
whole nets are timed the same way and the median of (measured - sum of pieces) becomes the table's per-net
offset. The table (latency.csv + latency.json, latency_table.py) can be measured on a phone-like device
and copied back.

Checking (`--check`): whole nets are exported, timed and compared with the table's prediction; prints
the errors and Kendall tau between predicted latency, FLOPs and measured latency.
`--space` is a config file (its space, data.image_size, space.stem_stride; --num_classes) or a rated
workdir (its ratings/meta.json).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import datetime
import json
import os
import platform
import re
import time
from typing import Any
from typing import NamedTuple

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
from dna_jax import run_once
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


class Timing(NamedTuple):
  """How every piece and net is timed (stored in the table's metadata, reused by --check)."""

  warmup: int = 5
  repeats: int = 20
  rounds: int = 5
  min_round_ms: float = 100.0

  @classmethod
  def of_table(cls, meta: dict[str, Any]) -> Timing:
    """The timing a table was measured with (tables from before rounds: one round, no minimum time)."""
    return cls(meta['warmup'], meta['repeats'], meta.get('rounds', 1), meta.get('min_round_ms', 0.0))


def timed_together(runs: Mapping[Any, Callable[[], Any]], timing: Timing) -> dict[Any, tuple[float, float, float, int]]:
  """(time, p10, p90) milliseconds of each run and its number of timed runs, the runs' rounds interleaved.

  Every run gets `timing.warmup` untimed calls, then `timing.rounds` rounds of at least `timing.repeats`
  calls and at least `timing.min_round_ms` (the count set from the warm-up's speed); round r of every run
  comes before round r + 1 of any. A run's time is the smallest of its round medians: a slow spell of the
  machine (another process on the cores, lasting seconds) lands in some rounds of a run, not in all.
  """
  per_round = {}
  for key, run in runs.items():
    start = time.perf_counter()
    for _ in range(timing.warmup):
      run()
    per_run_ms = 1000 * (time.perf_counter() - start) / max(timing.warmup, 1)
    per_round[key] = max(timing.repeats, int(np.ceil(timing.min_round_ms / max(per_run_ms, 1e-3))))
  times = {key: [] for key in runs}
  medians = {key: [] for key in runs}
  for r in range(timing.rounds):
    round_start = time.time()
    for key, run in runs.items():
      round_times = []
      for _ in range(per_round[key]):
        start = time.perf_counter()
        run()
        round_times.append(1000 * (time.perf_counter() - start))
      medians[key].append(float(np.median(round_times)))
      times[key] += round_times
    logging.info('timing round %d/%d of %d runs: %.1f s', r + 1, timing.rounds, len(runs), time.time() - round_start)
  result = {}
  for key in runs:
    best = min(medians[key])
    p10, p90 = np.percentile(times[key], [10, 90])
    result[key] = (best, float(min(p10, best)), float(max(p90, best)), len(times[key]))
  return result


def timed(run: Callable[[], Any], timing: Timing) -> tuple[float, float, float, int]:
  """(time, p10, p90) milliseconds of one run and its number of timed runs (see timed_together)."""
  return timed_together({0: run}, timing)[0]


def runner(model: Any, shape: tuple[int, ...], target: str, threads: int) -> Callable[[], Any]:
  """A call that runs `model` (inference mode, random weights) once on one input of `shape` on the target."""
  variables = run_once.jit(lambda r: model.init(r, jnp.zeros(shape), train=False))(jax.random.PRNGKey(0))
  predict = export.inference_fn(model, variables)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  if target == 'jax':
    compiled = jax.jit(predict)
    device_x = jax.device_put(x)
    return lambda: jax.block_until_ready(compiled(device_x))
  import tensorflow as tf  # only the TFLite target needs TensorFlow

  interpreter = tf.lite.Interpreter(model_content=export.tflite_bytes(predict, shape), num_threads=threads)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], x)
  return interpreter.invoke


def net_model(arch: space_lib.Architecture, num_classes: int, stem_stride: int) -> child.ChildNet:
  return child.ChildNet(arch, num_classes, 0.0, 0.0, stem_stride, NATIVE)


def build_runners(models: Mapping[Any, tuple[Any, tuple[int, ...]]], target: str, threads: int):
  """Exports (TFLite) or compiles (JAX) every (model, input shape) before any is timed, with an ETA."""
  start, runs = time.time(), {}
  for i, (key, (model, shape)) in enumerate(models.items(), 1):
    runs[key] = runner(model, shape, target, threads)
    eta = (time.time() - start) / i * (len(models) - i)
    logging.info('%d/%d ready for timing: %s (ETA %.0f s)', i, len(models), key, eta)
  return runs


def measure_nets(
  nets: list[tuple[str, space_lib.Architecture]],
  resolution: int,
  num_classes: int,
  stem_stride: int,
  target: str,
  threads: int,
  timing: Timing,
) -> dict[str, float]:
  """Measured milliseconds of whole nets (by name), timed together."""
  shape = (1, resolution, resolution, 3)
  models = {name: (net_model(arch, num_classes, stem_stride), shape) for name, arch in nets}
  return {name: m[0] for name, m in timed_together(build_runners(models, target, threads), timing).items()}


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
  spec: str, target: str, out: str, threads: int, timing: Timing, fit_nets: str, num_classes: int
) -> latency_table.LatencyTable:
  """Measures every piece of the space, fits the per-net offset on `fit_nets`, writes the table to `out`."""
  space, resolution, num_classes, stem_stride = load_space(spec, num_classes)
  keys = latency_table.space_keys(space, resolution, num_classes, stem_stride)
  logging.info('Measuring %d pieces of %s at %d px on %s.', len(keys), spec, resolution, target)
  start = time.time()
  runs = build_runners({key: (Piece(key), input_shape(key)) for key in keys}, target, threads)
  entries = timed_together(runs, timing)
  del runs
  meta = {
    'target': target,
    'device': str(jax.devices()[0]) if target == 'jax' else cpu_name(),
    'cpu': platform.platform(),
    'threads': threads,
    **timing._asdict(),
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
  nets = nets_to_check(fit_nets, space, seed=0)
  measured = measure_nets(nets, resolution, num_classes, stem_stride, target, threads, timing)
  for name, arch in nets:
    residuals.append(measured[name] - latency_table.predict_ms(table, arch, resolution, num_classes, stem_stride))
    logging.info('offset fit on %s: measured %.3f ms, residual %.3f ms', name, measured[name], residuals[-1])
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
  chosen = nets_to_check(nets, space, seed)
  timing = Timing.of_table(meta)
  measured_ms = measure_nets(chosen, resolution, num_classes, stem_stride, meta['target'], meta['threads'], timing)
  for name, arch in chosen:
    predicted = latency_table.predict_ms(table, arch, resolution, num_classes, stem_stride)
    measured = measured_ms[name]
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


DEFAULT_TIMING = Timing()
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
flags.DEFINE_integer('warmup', DEFAULT_TIMING.warmup, 'Untimed runs before timing.', flag_values=FLAGS)
flags.DEFINE_integer('repeats', DEFAULT_TIMING.repeats, 'Timed runs per round, at least.', flag_values=FLAGS)
flags.DEFINE_integer('rounds', DEFAULT_TIMING.rounds, 'Rounds; the smallest round median is kept.', flag_values=FLAGS)
flags.DEFINE_float(
  'min_round_ms', DEFAULT_TIMING.min_round_ms, 'Each round lasts at least this long.', flag_values=FLAGS
)
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
  timing = Timing(FLAGS.warmup, FLAGS.repeats, FLAGS.rounds, FLAGS.min_round_ms)
  if timing.warmup < 0 or timing.repeats < 1 or timing.rounds < 1 or timing.min_round_ms < 0:
    raise ValueError(f'--warmup >= 0, --repeats >= 1, --rounds >= 1 and --min_round_ms >= 0 expected, got {timing}')
  table = build_table(FLAGS.space, FLAGS.target, FLAGS.out, FLAGS.threads, timing, FLAGS.fit_nets, FLAGS.num_classes)
  print(
    f'Wrote {len(table.entries)} pieces to {FLAGS.out} in {table.meta["measure_seconds"]:.0f} s; '
    f'offset {table.offset_ms:.3f} ms per net.'
  )


if __name__ == '__main__':
  cli.run(main, FLAGS)
