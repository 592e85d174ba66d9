"""Rules that keep the code's shape: import contracts (pyproject.toml), ruff lint and format, module size, CI = README."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
LARGEST_MODULE_LINES = 550  # "no module larger than about 500 lines"


def run_tool(name, *args):
  return subprocess.run([os.path.join(BIN, name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
  out = run_tool('lint-imports')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '0 broken' in out.stdout


def test_ruff_lint_and_format_are_clean():
  lint = run_tool('ruff', 'check', '.')
  assert lint.returncode == 0, lint.stdout[-3000:]
  formatted = run_tool('ruff', 'format', '--check', '.')
  assert formatted.returncode == 0, formatted.stdout[-3000:]


def test_no_module_is_much_larger_than_500_lines():
  sizes = {}
  for folder, _, names in os.walk(os.path.join(ROOT, 'dna_jax')):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        with open(path) as f:
          sizes[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
  too_large = {path: lines for path, lines in sizes.items() if lines > LARGEST_MODULE_LINES}
  assert not too_large, too_large


def test_ci_runs_the_readme_test_command_verbatim():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  marker = '<!-- test-command -->\n```bash\n'
  assert readme.count(marker) == 1
  command = readme.split(marker, 1)[1].split('\n```', 1)[0].strip()
  assert command.startswith('python3 -m venv .venv') and 'pytest' in command
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f]
  assert command in ci_lines
