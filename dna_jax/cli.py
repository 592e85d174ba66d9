"""One command-line convention for every `python -m dna_jax.X`: absl flags and one-line user errors.

Each command defines its flags on its own `flags.FlagValues` (so that commands can be imported and
called side by side, as the tests do) and runs `cli.run(main, FLAGS)`. A user error, whether a bad
flag, a missing or unknown config file or key, or a ValueError / FileNotFoundError /
FloatingPointError raised by the work, ends the command with one `error: ...` line on stderr and
exit code 2; `DNA_JAX_TRACEBACK=1` re-raises it with its traceback. INFO records of Orbax, tfds and
etils (a dozen lines per checkpoint save) are hidden unless `DNA_JAX_VERBOSE=1`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import difflib
import importlib.util
import logging as std_logging
import os
import sys
from typing import Any

from absl import flags
from absl import logging

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)

# Libraries whose INFO records would bury our progress lines.
QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/etils/')


class QuietLibraries(std_logging.Filter):
  """Drops INFO and DEBUG records of QUIET_LIBRARIES."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(part in record.pathname for part in QUIET_LIBRARIES)


def _config_file(argv: Sequence[str], name: str) -> tuple[str, str | None] | None:
  """(path, argument) of `--NAME PATH[:ARG]` in argv, or None."""
  for i, arg in enumerate(argv):
    value = None
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    if value is not None:
      path, _, config_arg = value.partition(':')
      return path, config_arg or None
  return None


def load_config(path: str, arg: str | None) -> Any:
  spec = importlib.util.spec_from_file_location('dna_jax_cli_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _dotted_keys(config: Any, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, 'items'):
      keys += _dotted_keys(value, f'{prefix}{key}.')
  return keys


def config_key_error(argv: Sequence[str], name: str = 'config') -> str | None:
  """A one-line message for the first `--config.KEY=...` whose KEY the config does not have, or None."""
  located = _config_file(argv, name)
  if located is None:
    return None
  try:
    keys = set(_dotted_keys(load_config(*located)))
  except Exception:
    return None
  for arg in argv:
    if arg.startswith(f'--{name}.'):
      key = arg[len(name) + 3 :].split('=', 1)[0]
      if key not in keys:
        close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.5)
        hint = (
          f'closest: {", ".join(close)}' if close else f'sections: {", ".join(sorted(k for k in keys if "." not in k))}'
        )
        return f'unknown config key {key!r} in {arg} ({located[0]}); {hint}'
  return None


def check_config_file(argv: Sequence[str], name: str = 'config') -> None:
  """A clear error for a `--config` file that does not exist, before absl tries to load it."""
  located = _config_file(argv, name)
  if located is not None and not os.path.isfile(located[0]):
    raise ValueError(f'--{name} {located[0]}: no such config file (the configs are in configs/, e.g. configs/demo.py)')


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """Parses argv (argv[0] is the program) into `flag_values`; returns the positional arguments.

  Raises ValueError with a one-line message for every kind of bad command line.
  """
  if any(a in ('--help', '-h', '--helpfull', '--helpshort') for a in argv[1:]):
    print(flag_values.get_help())
    raise SystemExit(0)
  names = [n for n, f in flag_values._flags().items() if type(f).__name__.endswith('ConfigFlag')]
  for name in names:
    check_config_file(argv, name)
  try:
    return flag_values(list(argv))[1:]
  except flags.Error as e:
    message = str(e).splitlines()[0]
    for name in names:
      message = config_key_error(argv, name) or message
    raise ValueError(message) from None
  except (AttributeError, KeyError, TypeError) as e:
    for name in names:
      message = config_key_error(argv, name)
      if message:
        raise ValueError(message) from None
    raise ValueError(f'bad command line: {e}') from None


def call(
  main: Callable[[list[str]], int | None], flag_values: flags.FlagValues, args: Sequence[str] | None = None
) -> int:
  """Parses `args` (default: sys.argv[1:]) and runs `main(positional_args)`; returns the exit code (2 on a user error)."""
  argv = [sys.argv[0]] + list(sys.argv[1:] if args is None else args)
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if not os.environ.get('DNA_JAX_VERBOSE'):
    handler = logging.get_absl_handler()
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
      handler.addFilter(QuietLibraries())
  try:
    return main(parse(flag_values, argv)) or 0
  except USER_ERRORS as e:
    if os.environ.get('DNA_JAX_TRACEBACK'):
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    flag_values.unparse_flags()


def run(main: Callable[[list[str]], int | None], flag_values: flags.FlagValues) -> None:
  """`call` with sys.argv, then exit with its code: the `if __name__ == '__main__'` of every command."""
  sys.exit(call(main, flag_values))


def count(text: str) -> int:
  """'400M', '5.3e6', '350000000' -> int (budgets on the command line)."""
  scale = {'K': 1e3, 'M': 1e6, 'G': 1e9}.get(text[-1:].upper(), 1)
  try:
    value = float(text[:-1] if scale != 1 else text) * scale
  except ValueError:
    raise ValueError(f'not a count: {text!r} (e.g. 400M, 5.3e6, 350000000)') from None
  if value != value or value < 0 or value == float('inf'):
    raise ValueError(f'not a count: {text!r}')
  return int(value)
