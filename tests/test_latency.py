"""Latency tables: the file format, the exact search under a latency budget, and measuring a tiny space."""

import json

import jax
import numpy as np
import pytest

from dna_jax import cli
from dna_jax import describe
from dna_jax import latency
from dna_jax import latency_table
from dna_jax import random_nets
from dna_jax import search as search_lib
from dna_jax import space as space_lib

from test_search import RESOLUTION
from test_search import brute_force
from test_search import random_space
from test_search import write_random_ratings


def random_table(space, num_classes, seed=0):
  """A table of every piece of `space` with made-up timings (ms grows with the input size)."""
  rng = np.random.default_rng(seed)
  keys = latency_table.space_keys(space, RESOLUTION, num_classes, 2)
  entries = {key: (float(rng.uniform(0.1, 2.0) * key[6]), 0.0, 0.0, 3) for key in keys}
  return latency_table.LatencyTable(entries, {'target': 'test', 'threads': 1, 'device': 'none', 'offset_ms': 0.25})


def test_table_round_trips_and_a_missing_shape_is_named(tmp_path):
  space = space_lib.parse_space('2 16 1@8,2@8=*-k3e3; 1 24 1@12')
  table = random_table(space, 10)
  latency_table.write(str(tmp_path), table.entries, table.meta)
  read = latency_table.read(str(tmp_path))
  assert read.entries == table.entries and read.offset_ms == 0.25
  assert json.loads((tmp_path / 'latency.json').read_text())['target'] == 'test'
  latency_table.check_covers(read, space, RESOLUTION, 10, 2)
  wider = space_lib.parse_space('2 16 1@8,2@8=*-k3e3; 1 24 1@12,1@16')
  with pytest.raises(ValueError, match=r'no mbconv with in_channels=\d+, out_channels=16.*python -m dna_jax.latency'):
    latency_table.check_covers(read, wider, RESOLUTION, 10, 2)
  (tmp_path / 'latency.csv').write_text('piece,in_channels\nmbconv,3\n')
  with pytest.raises(ValueError, match=r'latency\.csv, line 1: expected header'):
    latency_table.read(str(tmp_path))


@pytest.mark.parametrize('seed', range(6))
def test_latency_budget_search_matches_brute_force(tmp_path, seed):
  rng = np.random.default_rng(seed)
  space = random_space(rng)
  ratings = write_random_ratings(str(tmp_path), space, rng, ties=seed % 2 == 0)
  table = random_table(space, ratings.num_classes, seed)
  timed = latency_table.with_latency(ratings, table)
  score, flops, _, rows = brute_force(ratings)
  latency = timed.fixed_latency + sum(timed.blocks[k].latency[rows[:, k]] for k in range(len(space.blocks)))
  # The predicted latency of a net is the table's sum over its pieces, whatever the route.
  for i in rng.integers(0, len(rows), 5):
    arch = random_nets.architecture(ratings, rows[i])
    assert latency[i] / 1e6 == pytest.approx(latency_table.predict_ms(table, arch, RESOLUTION, ratings.num_classes))
  for max_flops, max_ms in ((None, np.median(latency) / 1e6), (int(np.median(flops)), np.quantile(latency, 0.7) / 1e6)):
    feasible = np.flatnonzero((latency <= round(max_ms * 1e6)) & (flops <= (max_flops or flops.max())))
    results = search_lib.search(timed, max_flops, None, top_k=5, max_latency_ms=max_ms)
    assert [r.rows for r in results] == [tuple(rows[i]) for i in feasible[:5]]
    assert all(r.latency_ms <= max_ms + 1e-9 for r in results)
  costs, best = search_lib.pareto_front(timed, 'latency')
  for c, s in zip(costs, best):
    assert s == pytest.approx(score[latency <= c].min())
  with pytest.raises(ValueError, match='below the fastest architecture'):
    search_lib.search(timed, max_latency_ms=latency.min() / 1e6 * 0.5)
  with pytest.raises(ValueError, match='needs a latency table'):
    search_lib.search(ratings, max_latency_ms=1.0)


def test_a_disturbed_round_does_not_count():
  """Another process slowing the cores for a while slows whole rounds; the time is the quiet round's."""
  import time

  calls = []

  def run():
    calls.append(None)
    time.sleep(0.008 if len(calls) > 8 else 0.001)  # 2 warm-up runs, a quiet round, two disturbed ones

  ms, _, p90, count = latency.timed(run, latency.Timing(warmup=2, repeats=6, rounds=3, min_round_ms=0.0))
  assert count == 18 and len(calls) == 20
  assert 1.0 <= ms < 4.0 and p90 >= 8.0  # the median of all 18 runs: about 8 ms
  # Timed together, round r of every run comes before round r + 1 of any: a slow spell spanning the
  # first round of both runs leaves their second rounds quiet.
  clock = []

  def shared(name):
    def run():
      clock.append(name)
      time.sleep(0.006 if 5 <= len(clock) <= 12 else 0.001)  # after 2 + 2 warm-ups, round 1 is slow

    return run

  result = latency.timed_together({'a': shared('a'), 'b': shared('b')}, latency.Timing(2, 4, 2, 0.0))
  assert clock == ['a'] * 2 + ['b'] * 2 + ['a'] * 4 + ['b'] * 4 + ['a'] * 4 + ['b'] * 4
  assert all(1.0 <= ms < 4.0 and p90 >= 6.0 and count == 8 for ms, _, p90, count in result.values())
  # A round lasts at least min_round_ms: runs of 1 ms or more, 30 ms rounds -> at most 30 runs per round,
  # and more than the 2 repeats unless the warm-up run took over 6 ms.
  _, _, _, count = latency.timed(lambda: time.sleep(0.001), latency.Timing(1, 2, 2, min_round_ms=30.0))
  assert 2 * 5 <= count <= 2 * 30


def tiny_space_config(tmp_path):
  config = tmp_path / 'tiny.py'
  config.write_text(
    'from dna_jax import config_base\n'
    'def get_config(arg=None):\n'
    '  config = config_base.get_base_config()\n'
    "  config.space.update(dict(blocks='2 16 1@8=k3e6,1@8=k5e3', stem_width=8, ds_width=8, head_width=16))\n"
    '  config.data.image_size = 16\n'
    '  return config\n'
  )
  return config


def test_measuring_a_tiny_space_and_describing_with_the_table(tmp_path, capsys):
  """Every piece of a tiny space exported to TFLite and timed, the offset fitted, the table checked."""
  config = tiny_space_config(tmp_path)
  out = tmp_path / 'table'
  args = ['--space', str(config), '--out', str(out), '--num_classes', '3', '--repeats', '3', '--warmup', '1']
  args += ['--rounds', '2', '--min_round_ms', '5']
  assert cli.call(latency.main, latency.FLAGS, [*args, '--fit_nets', 'random:1']) == 0
  table = latency_table.read(str(out))
  space = space_lib.parse_space('2 16 1@8=k3e6,1@8=k5e3', 8, 8, 16)
  assert set(table.entries) == set(latency_table.space_keys(space, 16, 3, 2)) and len(table.entries) == 4
  assert all(ms > 0 and p10 <= ms <= p90 for ms, p10, p90, _ in table.entries.values())
  assert table.meta['target'] == 'tflite_cpu' and table.meta['threads'] == 1 and 'offset_ms' in table.meta
  assert latency.Timing.of_table(table.meta) == latency.Timing(1, 3, 2, 5.0)
  arch = str(space_lib.make_architecture(space, [(0, (0,))]))
  report = latency.check_table(str(out), str(config), f'random:2,{arch}', 3)  # strings hold commas too
  assert len(report['nets']) == 3 and all(r['measured_ms'] > 0 for r in report['nets'])
  assert report['nets'][2]['arch'] == arch
  assert (
    cli.call(
      describe.main, describe.FLAGS, [arch, '--resolution', '16', '--num_classes', '3', '--latency_table', str(out)]
    )
    == 0
  )
  assert 'predicted latency' in capsys.readouterr().out
  assert cli.call(latency.main, latency.FLAGS, args) == 2  # never overwrites a table
  capsys.readouterr()
  bad = [*args[:3], str(tmp_path / 'other'), *args[4:], '--rounds', '0']
  assert cli.call(latency.main, latency.FLAGS, bad) == 2
  assert '--rounds >= 1' in capsys.readouterr().err


def test_adaptive_ratings_take_a_latency_budget_only_when_pruned_on_latency(tmp_path):
  import dataclasses

  from dna_jax import path_pruning

  rng = np.random.default_rng(3)
  space = random_space(rng)
  ratings = write_random_ratings(str(tmp_path), space, rng, ties=False)
  table = random_table(space, ratings.num_classes)
  timed = latency_table.with_latency(ratings, table)
  budget = float(timed.fixed_latency + sum(int(b.latency.max()) for b in timed.blocks)) / 1e6
  on_costs = dataclasses.replace(timed, pruned_for_top_k=3, pruned_costs=('flops', 'params'))
  with pytest.raises(ValueError, match='pruned on latency too'):
    search_lib.search(on_costs, top_k=1, max_latency_ms=budget)
  on_latency = dataclasses.replace(on_costs, pruned_costs=('flops', 'params', 'latency:T'))
  assert search_lib.search(on_latency, top_k=1, max_latency_ms=budget)
  # The pruning's cost columns: FLOPs, params and the table's nanoseconds at every input width.
  widths = space_lib.block_input_widths(space, 1)
  cell = space.blocks[1].cells[0]
  costs = path_pruning.block_path_costs(space, 1, RESOLUTION, 2, table)[0]
  assert costs.shape == (cell.num_paths, 3 * len(widths))
  size = space_lib.block_sizes(space, RESOLUTION, 2)[1]
  ops = next(iter(cell.paths()))
  assert costs[0, 2 * len(widths)] == round(latency_table.cell_ms(table, cell, ops, widths[0], size) * 1e6)


def test_the_jax_target_times_the_same_pieces_as_jitted_functions(tmp_path):
  config = tiny_space_config(tmp_path)
  out = tmp_path / 'table'
  args = ['--space', str(config), '--out', str(out), '--num_classes', '3', '--target', 'jax', '--fit_nets', 'random:1']
  args += ['--repeats', '2', '--warmup', '1', '--rounds', '2', '--min_round_ms', '1']
  assert cli.call(latency.main, latency.FLAGS, args) == 0
  table = latency_table.read(str(out))
  assert len(table.entries) == 4 and all(ms > 0 and count >= 4 for ms, _, _, count in table.entries.values())
  assert table.meta['target'] == 'jax' and table.meta['device'] == str(jax.devices()[0])
  report = latency.check_table(str(out), str(config), 'random:2', 3)
  assert len(report['nets']) == 2 and all(r['measured_ms'] > 0 for r in report['nets'])
