"""tpu_scripts/: shell syntax, shellcheck, the exact commands of --dry-run, the remote job, the notebook.

gcloud is never called: a fake `gcloud` that fails sits first on PATH in every script run.
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import nbformat
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(REPO_ROOT, 'tpu_scripts')
RUNNABLE = ['create_vm.sh', 'install.sh', 'launch.sh', 'logs.sh', 'delete_vm.sh']
ALL_SCRIPTS = ['common.sh'] + RUNNABLE
SETTINGS = [
  'TPU_NAME',
  'ZONE',
  'PROJECT',
  'ACCELERATOR_TYPE',
  'RUNTIME_VERSION',
  'REPO_URL',
  'REPO_BRANCH',
  'REMOTE_DIR',
  'REMOTE_VENV',
  'REMOTE_PYTHON',
  'RUN_LOG',
  'DRY_RUN',
]

TPU_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']
NAME = ['--name', 'dna-test', '--zone', 'us-west4-a']
LOCATION = ['dna-test', '--zone=us-west4-a']
LIBTPU_URL = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
MAIN_ARGS = [
  '--config',
  'configs/demo.py',
  '--workdir',
  'gs://bucket/run',
  '--config.stages=distill,rate',
  '--',
  "--config.name=it's a test",
]
EXPECTED_ARGV = [
  '--config',
  'configs/demo.py',
  '--workdir',
  'gs://bucket/run',
  '--config.stages=distill,rate',
  "--config.name=it's a test",
]


def _load_make_notebook():
  spec = importlib.util.spec_from_file_location('make_notebook', os.path.join(SCRIPTS_DIR, 'make_notebook.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


make_notebook = _load_make_notebook()


@pytest.fixture(name='env')
def fixture_env(tmp_path):
  """Environment without the scripts' settings, a failing fake gcloud first on PATH, TMPDIR in tmp."""
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  gcloud = fake_bin / 'gcloud'
  gcloud.write_text('#!/bin/sh\necho "fake gcloud called: $*" >&2\nexit 97\n')
  gcloud.chmod(0o755)
  (fake_bin / 'python').symlink_to(sys.executable)
  env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
  env['PATH'] = f'{fake_bin}{os.pathsep}{env["PATH"]}'
  env['TMPDIR'] = str(tmp_path)
  return env


def _run_script(name, args, env, returncode=0):
  result = subprocess.run(
    ['bash', os.path.join(SCRIPTS_DIR, name), *args], env=env, capture_output=True, text=True, timeout=60, check=False
  )
  assert 'fake gcloud called' not in result.stderr, result.stderr
  assert result.returncode == returncode, result.stderr
  return result


def _dry_run(name, args, env):
  """The printed commands, one list of words per line."""
  return [shlex.split(line) for line in _run_script(name, ['--dry-run', *args], env).stdout.splitlines()]


def _shell_words(text):
  """Words and operators of a shell command line, quotes removed (`a; b)` -> a, ;, b, ))."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _find(words, expected):
  for start in range(len(words) - len(expected) + 1):
    if words[start : start + len(expected)] == expected:
      return start
  raise AssertionError(f'{expected} not in {words}')


def _remote_command(line):
  assert line[-1].startswith('--command='), line
  return line[-1][len('--command=') :]


def _job_of(launch_command):
  """The command that launch.sh runs detached: the argument of `setsid nohup bash -c`."""
  words = _shell_words(launch_command)
  return words[_find(words, ['setsid', 'nohup', 'bash', '-c']) + 4]


@pytest.mark.parametrize('name', ALL_SCRIPTS)
def test_bash_syntax(name):
  result = subprocess.run(['bash', '-n', os.path.join(SCRIPTS_DIR, name)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


def test_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed')
  paths = [os.path.join(SCRIPTS_DIR, name) for name in ALL_SCRIPTS]
  result = subprocess.run(['shellcheck', '-x', *paths], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_benchmark_shell_script_syntax_and_shellcheck():
  path = os.path.join(REPO_ROOT, 'benchmarks', 'accelerator.sh')
  result = subprocess.run(['bash', '-n', path], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed')
  result = subprocess.run(['shellcheck', path], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_fake_gcloud_is_what_the_scripts_would_call(env):
  result = subprocess.run(
    ['bash', '-c', 'gcloud compute tpus list'], env=env, capture_output=True, text=True, check=False
  )
  assert result.returncode == 97
  assert 'fake gcloud called: compute tpus list' in result.stderr


@pytest.mark.parametrize('name', RUNNABLE)
def test_help(name, env):
  result = _run_script(name, ['--help'], env)
  assert result.stdout.startswith(f'Usage: tpu_scripts/{name}')
  assert '--dry-run' in result.stdout


@pytest.mark.parametrize('name', RUNNABLE)
def test_unknown_option_fails(name, env):
  result = _run_script(name, ['--dry-run', '--no-such-option'], env, returncode=2)
  assert 'unknown option: --no-such-option' in result.stderr


def test_create_single_host(env):
  lines = _dry_run(
    'create_vm.sh', [*NAME, '--accelerator-type', 'v4-8', '--runtime-version', 'tpu-ubuntu2204-base'], env
  )
  assert lines == [[*TPU_VM, 'create', *LOCATION, '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']]


def test_create_spot_v5e_with_equals_options(env):
  lines = _dry_run(
    'create_vm.sh',
    [
      '--name=dna-test',
      '--zone=us-west4-a',
      '--accelerator-type=v5litepod-8',
      '--runtime-version=v2-alpha-tpuv5-lite',
      '--spot',
    ],
    env,
  )
  assert lines == [
    [*TPU_VM, 'create', *LOCATION, '--accelerator-type=v5litepod-8', '--version=v2-alpha-tpuv5-lite', '--spot']
  ]


def test_create_pod_slice_from_environment(env):
  env.update(TPU_NAME='dna-pod', ZONE='us-central2-b', PROJECT='my-project', ACCELERATOR_TYPE='v4-32')
  lines = _dry_run('create_vm.sh', ['--spot', '--', '--network=my-net'], env)
  assert lines == [
    [
      *TPU_VM,
      'create',
      'dna-pod',
      '--zone=us-central2-b',
      '--project=my-project',
      '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base',
      '--spot',
      '--network=my-net',
    ]
  ]


def test_delete(env):
  assert _dry_run('delete_vm.sh', NAME, env) == [[*TPU_VM, 'delete', *LOCATION]]
  assert _dry_run('delete_vm.sh', [*NAME, '--yes'], env) == [[*TPU_VM, 'delete', *LOCATION, '--quiet']]


def test_logs(env):
  assert _dry_run('logs.sh', NAME, env) == [
    [*TPU_VM, 'ssh', *LOCATION, '--worker=0', '--command=tail -n 100 -F dna_jax_run.log']
  ]
  assert _dry_run('logs.sh', [*NAME, '--worker', 'all', '--lines=20', '--no-follow'], env) == [
    [*TPU_VM, 'ssh', *LOCATION, '--worker=all', '--command=tail -n 20 dna_jax_run.log']
  ]


def _jax_pin():
  with open(os.path.join(REPO_ROOT, 'requirements.txt'), encoding='utf-8') as requirements:
    return make_notebook.jax_version(requirements.read())


def _assert_installs_packages(remote):
  assert 'dna_jax_venv/bin/python -m pip install -q -r dna_jax/requirements.txt' in remote
  assert f"dna_jax_venv/bin/python -m pip install -q -U 'jax[tpu]=={_jax_pin()}' -f {LIBTPU_URL}" in remote
  assert 'python3.11 -m venv dna_jax_venv' in remote
  assert subprocess.run(['bash', '-n', '-c', remote], check=False).returncode == 0


def test_install_from_git(env):
  env['REPO_URL'] = 'https://example.com/dna_jax.git'
  lines = _dry_run('install.sh', [*NAME, '--branch', 'v1'], env)
  assert len(lines) == 1
  assert lines[0][:-1] == [*TPU_VM, 'ssh', *LOCATION, '--worker=all']
  remote = _remote_command(lines[0])
  assert 'git clone --depth=1 --branch v1 https://example.com/dna_jax.git dna_jax' in remote
  _assert_installs_packages(remote)


def test_install_copies_this_checkout(env, tmp_path):
  tarball = str(tmp_path / 'dna-test_dna_jax_code.tar.gz')
  lines = _dry_run('install.sh', NAME, env)
  assert len(lines) == 3
  tar, scp, ssh = lines
  assert tar[0] == 'tar' and tar[-5:] == ['-czf', tarball, '-C', REPO_ROOT, '.']
  assert scp == [*TPU_VM, 'scp', tarball, 'dna-test:dna_jax_code.tar.gz', '--zone=us-west4-a', '--worker=all']
  assert ssh[:-1] == [*TPU_VM, 'ssh', *LOCATION, '--worker=all']
  remote = _remote_command(ssh)
  assert 'mkdir -p dna_jax && tar -xzf dna_jax_code.tar.gz -C dna_jax' in remote
  _assert_installs_packages(remote)

  # The same tar command on a small tree keeps the code and leaves out git data, caches and workdirs.
  tree = tmp_path / 'tree'
  for relative in [
    '.git/HEAD',
    'dna_jax/main.py',
    'dna_jax/__pycache__/main.cpython-311.pyc',
    'configs/demo.py',
    'workdir_demo/summary.txt',
    '.venv/bin/python',
    'README.md',
  ]:
    (tree / relative).parent.mkdir(parents=True, exist_ok=True)
    (tree / relative).write_text('x')
  subprocess.run([*tar[:-5], '-czf', tarball, '-C', str(tree), '.'], check=True)
  with tarfile.open(tarball) as archive:
    files = sorted(member.name for member in archive.getmembers() if member.isfile())
  assert files == ['./README.md', './configs/demo.py', './dna_jax/main.py']


def test_launch(env):
  lines = _dry_run('launch.sh', [*NAME, *MAIN_ARGS], env)
  assert len(lines) == 1
  assert lines[0][:-1] == [*TPU_VM, 'ssh', *LOCATION, '--worker=all']
  launch = _remote_command(lines[0])
  launch_words = _shell_words(launch)
  start = _find(launch_words, ['setsid', 'nohup', 'bash', '-c'])
  assert launch_words[start + 5 : start + 14] == [
    '>>',
    'dna_jax_run.log',
    '2',
    '>&',
    '1',
    '<',
    '/dev/null',
    '&',
    'echo',
  ]
  job = _shell_words(_job_of(launch))
  main = ['DNA_JAX_DISTRIBUTED=1', 'python', '-m', 'dna_jax.main', *EXPECTED_ARGV]
  assert job[:10] == [
    '(',
    'source',
    'dna_jax_venv/bin/activate',
    '&&',
    'cd',
    'dna_jax',
    '&&',
    'export',
    'PYTHONUNBUFFERED=1',
    '&&',
  ]
  assert job[_find(job, main) :] == [*main, ');', 'echo', '$?', '>', 'dna_jax_run.rc']  # `);`: one operator word


def test_launch_refuses_missing_or_unsafe_arguments(env):
  result = _run_script('launch.sh', ['--dry-run', '--config', 'configs/demo.py'], env, returncode=2)
  assert '--workdir is required' in result.stderr
  result = _run_script('launch.sh', ['--dry-run', '--workdir', 'gs://bucket/run'], env, returncode=2)
  assert '--config is required' in result.stderr
  result = _run_script(
    'launch.sh', ['--dry-run', '--spot', '--config', 'c.py', '--workdir', '/tmp/run'], env, returncode=2
  )
  assert '--spot needs a gs:// workdir' in result.stderr


def test_launch_spot_recreates_reinstalls_and_reruns(env):
  env['REPO_URL'] = 'https://example.com/dna_jax.git'
  lines = _dry_run('launch.sh', [*NAME, '--spot', *MAIN_ARGS], env)
  launch = _dry_run('launch.sh', [*NAME, *MAIN_ARGS], env)[0]
  install = _dry_run('install.sh', NAME, env)[0]
  describe, status, delete, create, *rebuild = lines
  assert describe == [*TPU_VM, 'describe', *LOCATION, '--format=value(state)']
  assert status[:-1] == [*TPU_VM, 'ssh', *LOCATION, '--worker=all']
  assert delete == [*TPU_VM, 'delete', *LOCATION, '--quiet']
  assert create == [*TPU_VM, 'create', *LOCATION, '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base', '--spot']
  assert rebuild == [install, launch]


def _recording_gcloud(env, tmp_path, states=(), statuses=()):
  """Replaces the failing fake by one that records its arguments and plays a VM: `describe` answers the
  next of STATES (then READY), the run-status ssh the next of STATUSES; every other call succeeds."""
  script = tmp_path / 'bin' / 'gcloud'
  script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
folder = pathlib.Path({str(tmp_path)!r})
with open(folder / 'calls.jsonl', 'a') as calls:
  calls.write(json.dumps(sys.argv[1:]) + '\\n')
def next_of(name, default):
  path = folder / name
  queue = json.loads(path.read_text()) if path.exists() else []
  path.write_text(json.dumps(queue[1:]))
  return queue[0] if queue else default
if sys.argv[4] == 'describe':
  print(next_of('states.json', 'READY'))
elif sys.argv[4] == 'ssh' and 'DNA_JAX_RUNNING' in sys.argv[-1]:
  print(next_of('statuses.json', 'DNA_JAX_RUNNING'))
""")
  (tmp_path / 'states.json').write_text(json.dumps(list(states)))
  (tmp_path / 'statuses.json').write_text(json.dumps(list(statuses)))

  def calls():
    with open(tmp_path / 'calls.jsonl', encoding='utf-8') as recorded:
      return [['gcloud', *json.loads(line)] for line in recorded]

  return calls


@pytest.mark.parametrize(
  'name, args',
  [
    ('create_vm.sh', ['--spot']),
    ('delete_vm.sh', ['--yes']),
    ('logs.sh', ['--worker', 'all']),
    ('install.sh', []),
    ('launch.sh', MAIN_ARGS),
  ],
)
def test_real_run_calls_gcloud_with_the_printed_words(name, args, env, tmp_path):
  env['REPO_URL'] = 'https://example.com/dna_jax.git'  # install.sh: no tar of this checkout
  printed = _dry_run(name, [*NAME, *args], env)
  calls = _recording_gcloud(env, tmp_path)
  result = subprocess.run(
    ['bash', os.path.join(SCRIPTS_DIR, name), *NAME, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert calls() == printed


def _spot_loop(env, tmp_path, states, statuses, returncode):
  env['REPO_URL'] = 'https://example.com/dna_jax.git'
  calls = _recording_gcloud(env, tmp_path, states, statuses)
  result = subprocess.run(
    ['bash', os.path.join(SCRIPTS_DIR, 'launch.sh'), *NAME, '--spot', '--poll', '0', *MAIN_ARGS],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode == returncode, result.stderr
  return [
    call[4]
    if call[4] != 'ssh'
    else ('status' if 'DNA_JAX_RUNNING' in call[-1] else 'launch' if 'dna_jax.main' in call[-1] else 'install')
    for call in calls()
  ], result.stderr


def test_spot_loop_recreates_a_preempted_vm_and_stops_when_the_run_ends(env, tmp_path):
  steps, log = _spot_loop(
    env,
    tmp_path,
    ['READY', 'READY', 'PREEMPTED', 'CREATING'],
    ['DNA_JAX_RUNNING', 'DNA_JAX_RC=0\nDNA_JAX_RC=0'],
    returncode=0,
  )
  assert steps == [
    'describe',
    'launch',
    'describe',
    'status',
    'describe',
    'delete',
    'create',
    'install',
    'launch',
    'describe',
    'describe',
    'status',
  ]
  assert 'The run finished on all workers' in log


def test_spot_loop_stops_when_the_run_fails(env, tmp_path):
  steps, log = _spot_loop(env, tmp_path, [], ['DNA_JAX_RC=0\nDNA_JAX_RC=1'], returncode=1)
  assert steps == ['describe', 'launch', 'describe', 'status']
  assert 'The run failed on a worker' in log


def _wait_for(path, seconds=20):
  deadline = time.monotonic() + seconds
  while not path.exists():
    assert time.monotonic() < deadline, f'{path} did not appear'
    time.sleep(0.05)


def test_launch_remote_command_runs_main_detached_once(env, tmp_path):
  """Runs launch.sh's remote command here, in a fake home with a fake dna_jax.main."""
  if shutil.which('setsid') is None:
    pytest.skip('setsid (util-linux, present on TPU VMs) is not installed')
  home = tmp_path / 'home'
  (home / 'dna_jax_venv' / 'bin').mkdir(parents=True)
  (home / 'dna_jax_venv' / 'bin' / 'activate').write_text('export FAKE_VENV_ACTIVE=1\n')
  package = home / 'dna_jax' / 'dna_jax'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('')
  (package / 'main.py').write_text(
    'import json, os, pathlib, sys, time\n'
    "home = pathlib.Path(os.environ['HOME'])\n"
    "(home / 'seen.json').write_text(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
    "    'distributed': os.environ.get('DNA_JAX_DISTRIBUTED'), 'venv': os.environ.get('FAKE_VENV_ACTIVE')}))\n"
    "while not (home / 'release').exists():\n"
    '  time.sleep(0.05)\n'
    "print('fake run done')\n"
  )
  launch = _remote_command(_dry_run('launch.sh', [*NAME, *MAIN_ARGS], env)[0])
  status = _remote_command(_dry_run('launch.sh', [*NAME, '--spot', *MAIN_ARGS], env)[1])
  env['HOME'] = str(home)

  def remote(command):
    return subprocess.run(
      ['bash', '-c', command], cwd=home, env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout

  try:
    assert 'dna_jax started on' in remote(launch)
    _wait_for(home / 'seen.json')
    assert json.loads((home / 'seen.json').read_text()) == {
      'argv': EXPECTED_ARGV,
      'cwd': str(home / 'dna_jax'),
      'distributed': '1',
      'venv': '1',
    }
    assert remote(status) == 'DNA_JAX_RUNNING\n'
    assert 'already running' in remote(launch)
    (home / 'release').write_text('')
    _wait_for(home / 'dna_jax_run.rc')
    assert remote(status) == 'DNA_JAX_RC=0\n'
    log = (home / 'dna_jax_run.log').read_text()
    assert log.count('=== ') == 1 and log.endswith('fake run done\n')
  finally:
    (home / 'release').write_text('')


def test_read_demo_command():
  readme = (
    '# dna_jax\n\nSome text.\n\n<!-- demo-command -->\n```bash\n'
    'python -m pip install -r requirements.txt && python -m dna_jax.main --config configs/demo.py '
    '--workdir /tmp/dna_demo\n```\n\nMore.\n```bash\nls\n```\n'
  )
  assert make_notebook.read_demo_command(readme) == (
    'python -m pip install -r requirements.txt && python -m dna_jax.main --config configs/demo.py '
    '--workdir /tmp/dna_demo'
  )
  with pytest.raises(ValueError, match='exactly one demo command marker'):
    make_notebook.read_demo_command('```bash\nls\n```\n')
  with pytest.raises(ValueError, match='must be ```bash'):
    make_notebook.read_demo_command('<!-- demo-command -->\n\n```bash\nls\n```\n')
  assert make_notebook.workdir_of('python -m dna_jax.main --config c.py --workdir=/tmp/w') == '/tmp/w'
  assert make_notebook.workdir_of('python -m dna_jax.main --workdir runs/demo') == '/content/dna_jax/runs/demo'


def _notebook():
  with open(make_notebook.NOTEBOOK_PATH, encoding='utf-8') as notebook_file:
    return notebook_file.read()


def test_notebook_is_valid_with_empty_outputs():
  notebook = nbformat.reads(_notebook(), as_version=nbformat.NO_CONVERT)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code_cells and all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
  assert notebook.metadata.accelerator == 'TPU'


def _readme_demo_command():
  if not os.path.exists(make_notebook.README_PATH):
    pytest.fail(f'README.md is missing. It must hold the demo command as {make_notebook.MARKER_FORMAT}')
  with open(make_notebook.README_PATH, encoding='utf-8') as readme:
    try:
      return make_notebook.read_demo_command(readme.read())
    except ValueError as error:
      pytest.fail(str(error))


def test_notebook_runs_the_readme_demo_command():
  command = _readme_demo_command()
  cells = {cell.id: cell for cell in nbformat.reads(_notebook(), as_version=4).cells}
  demo_source = cells['demo-command'].source
  assert demo_source.splitlines()[-len(command.splitlines()) :] == command.splitlines(), (
    'the notebook does not run the README demo command: python tpu_scripts/make_notebook.py'
  )
  assert demo_source == make_notebook.demo_cell_source(command)
  workdir = make_notebook.workdir_of(command)
  assert f"WORKDIR = '{workdir}'" in cells['pareto'].source
  assert "os.path.join(WORKDIR, 'search', 'pareto.png')" in cells['pareto'].source
  assert "os.path.join(WORKDIR, 'summary.txt')" in cells['summary'].source
  assert f'"jax[tpu]=={_jax_pin()}" -f {LIBTPU_URL}' in cells['install'].source


def test_notebook_is_what_make_notebook_writes():
  expected = nbformat.writes(make_notebook.build_notebook(_readme_demo_command(), _jax_pin()))
  assert _notebook() == expected, 'out of date: python tpu_scripts/make_notebook.py'


def test_notebook_clones_the_given_repository_url():
  url = 'https://example.com/me/dna_jax.git'
  cells = {cell.id: cell for cell in make_notebook.build_notebook(_readme_demo_command(), _jax_pin(), url).cells}
  assert f"REPO_URL = '{url}'" in cells['clone'].source
  default = {cell.id: cell for cell in make_notebook.build_notebook(_readme_demo_command(), _jax_pin()).cells}
  assert f"REPO_URL = '{make_notebook.REPO_URL}'" in default['clone'].source
  assert "if 'OWNER' in REPO_URL" in default['clone'].source
