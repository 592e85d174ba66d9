"""Writes tpu_scripts/colab_tpu.ipynb, the Colab TPU demo notebook (outputs empty).

python tpu_scripts/make_notebook.py           # regenerate after README.md's demo command changes
python tpu_scripts/make_notebook.py --check   # exit 1 if the committed notebook is out of date
python tpu_scripts/make_notebook.py --repo_url https://github.com/ME/dna_jax.git   # a fork's notebook

The notebook runs exactly the README's demo command: the fenced block that follows the line
`<!-- demo-command -->` in README.md:

    <!-- demo-command -->
    ```bash
    python -m pip install -r requirements.txt && python -m dna_jax.main --config configs/demo.py --workdir /tmp/dna_demo
    ```
"""

import argparse
import os
import re
import sys

import nbformat

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_PATH = os.path.join(REPO_ROOT, 'README.md')
REQUIREMENTS_PATH = os.path.join(REPO_ROOT, 'requirements.txt')
NOTEBOOK_PATH = os.path.join(REPO_ROOT, 'tpu_scripts', 'colab_tpu.ipynb')

DEMO_MARKER = '<!-- demo-command -->'
# Used only while README.md has no marked block yet (a warning says so); the test compares with README.
FALLBACK_DEMO_COMMAND = (
  'python -m pip install -r requirements.txt && python -m dna_jax.main --config configs/demo.py --workdir /tmp/dna_demo'
)
# The project has no public URL yet: the notebook asks for one (its REPO_URL field, or --repo_url here)
# and refuses to clone while the URL contains "OWNER".
REPO_URL = 'https://github.com/OWNER/dna_jax.git'
COLAB_REPO_DIR = '/content/dna_jax'
LIBTPU_URL = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'

MARKER_FORMAT = f"""the line {DEMO_MARKER} directly followed by a ```bash fenced block, e.g.

{DEMO_MARKER}
```bash
{FALLBACK_DEMO_COMMAND}
```"""


def read_demo_command(readme_text):
  """The demo command of README.md: the ```bash block right after the marker line, lines kept as is."""
  lines = readme_text.splitlines()
  starts = [i for i, line in enumerate(lines) if line.strip() == DEMO_MARKER]
  if len(starts) != 1:
    raise ValueError(f'README.md must hold exactly one demo command marker ({len(starts)} found): {MARKER_FORMAT}')
  fence = starts[0] + 1
  if fence >= len(lines) or lines[fence].strip() != '```bash':
    raise ValueError(f'The line after {DEMO_MARKER} in README.md must be ```bash: {MARKER_FORMAT}')
  for end in range(fence + 1, len(lines)):
    if lines[end].strip() == '```':
      command = '\n'.join(lines[fence + 1 : end]).strip('\n')
      if not command.strip():
        raise ValueError(f'The demo command block in README.md is empty: {MARKER_FORMAT}')
      return command
  raise ValueError(f'The demo command block in README.md has no closing ```: {MARKER_FORMAT}')


def workdir_of(command):
  """The local --workdir of the demo command (where the notebook finds the plot and summary)."""
  found = re.findall(r'--workdir[= ]([^\s;&|]+)', command)
  if len(found) != 1:
    raise ValueError(f'The demo command must name exactly one --workdir: {command!r}')
  workdir = found[0].strip('\'"')
  if '://' in workdir:
    raise ValueError(f'The Colab notebook needs a local --workdir, got {workdir!r}')
  return workdir if os.path.isabs(workdir) else f'{COLAB_REPO_DIR}/{workdir}'


def jax_version(requirements_text):
  found = re.findall(r'^jax==([^\s;#]+)', requirements_text, flags=re.MULTILINE)
  if len(found) != 1:
    raise ValueError('requirements.txt must pin jax exactly once (jax==VERSION)')
  return found[0]


def demo_cell_source(command):
  """The source of the cell that runs the demo: the README command verbatim under bash."""
  return f'%%bash\nset -euo pipefail\ncd {COLAB_REPO_DIR}\n{command}'


def build_notebook(command, jax_pin, repo_url=REPO_URL):
  """The notebook as an nbformat v4 node, cells with fixed ids so regeneration is byte-stable."""
  workdir = workdir_of(command)
  markdown, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
  cells = [
    markdown(
      '# dna_jax on a Colab TPU\n\n'
      'Runs the whole DNA pipeline (blockwise distillation, rating of every path, search under a '
      'cost budget, retraining, export) on the small Fashion-MNIST demo, then shows the Pareto plot '
      'and the summary.\n\n'
      'First choose **Runtime > Change runtime type > TPU** (v5e-1 or v6e-1), then '
      '**Runtime > Run all**. tfds downloads Fashion-MNIST on the first run. '
      'For TPU VMs and pod slices see `tpu_scripts/README.md`.',
      id='intro',
    ),
    code(
      'import os\n'
      'import subprocess\n\n'
      f'REPO_URL = \'{repo_url}\'  # @param {{type:"string"}}\n'
      f"REPO_DIR = '{COLAB_REPO_DIR}'\n\n"
      'if not os.path.isdir(REPO_DIR):\n'
      "  if 'OWNER' in REPO_URL:\n"
      "    raise ValueError('Set REPO_URL to the git URL of dna_jax (or upload the code to ' + REPO_DIR + ')')\n"
      "  subprocess.run(['git', 'clone', '--depth=1', REPO_URL, REPO_DIR], check=True)\n"
      'os.chdir(REPO_DIR)\n'
      'print(os.getcwd())',
      id='clone',
    ),
    code(
      '# The pinned requirements, then the TPU build of the same jax (libtpu).\n'
      '!python -m pip install -q -r requirements.txt\n'
      f'!python -m pip install -q -U "jax[tpu]=={jax_pin}" -f {LIBTPU_URL}',
      id='install',
    ),
    code(
      '# In a fresh process, so the kernel keeps no stale imports from before the install.\n'
      'import sys\n\n'
      "PROBE = 'import jax; print(jax.devices()); print(jax.default_backend())'\n"
      "check = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True)\n"
      'print(check.stdout, check.stderr)\n'
      "assert check.stdout.split()[-1:] == ['tpu'], 'No TPU: choose Runtime > Change runtime type > TPU'",
      id='check-tpu',
    ),
    markdown('## The demo\n\nExactly the demo command of the README (a few minutes on a TPU).', id='demo-intro'),
    code(demo_cell_source(command), id='demo-command'),
    code(
      'from IPython.display import Image, display\n\n'
      f"WORKDIR = '{workdir}'\n"
      "display(Image(filename=os.path.join(WORKDIR, 'search', 'pareto.png')))",
      id='pareto',
    ),
    code("with open(os.path.join(WORKDIR, 'summary.txt')) as summary:\n  print(summary.read())", id='summary'),
  ]
  notebook = nbformat.v4.new_notebook(cells=cells)
  notebook.metadata = {
    'accelerator': 'TPU',
    'colab': {'provenance': [], 'gpuType': 'V5E1'},
    'kernelspec': {'name': 'python3', 'display_name': 'Python 3'},
    'language_info': {'name': 'python'},
  }
  nbformat.validate(notebook)
  return notebook


def demo_command_from_readme():
  """README.md's demo command, or the fallback with a warning while README.md has none."""
  try:
    with open(README_PATH, encoding='utf-8') as readme:
      return read_demo_command(readme.read())
  except (OSError, ValueError) as error:
    print(f'warning: using the built-in demo command ({error})', file=sys.stderr)
    return FALLBACK_DEMO_COMMAND


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='exit 1 if the notebook is out of date')
  parser.add_argument(
    '--repo_url',
    default=REPO_URL,
    help='git URL the notebook clones (default: a placeholder that the notebook asks the user to replace)',
  )
  args = parser.parse_args()
  with open(REQUIREMENTS_PATH, encoding='utf-8') as requirements:
    jax_pin = jax_version(requirements.read())
  text = nbformat.writes(build_notebook(demo_command_from_readme(), jax_pin, args.repo_url))
  if args.check:
    with open(NOTEBOOK_PATH, encoding='utf-8') as committed:
      if committed.read() != text:
        sys.exit(f'{NOTEBOOK_PATH} is out of date: run python tpu_scripts/make_notebook.py')
    return
  with open(NOTEBOOK_PATH, 'w', encoding='utf-8') as notebook_file:
    notebook_file.write(text)
  print(f'wrote {NOTEBOOK_PATH}')


if __name__ == '__main__':
  main()
