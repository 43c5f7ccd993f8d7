"""The `llm-jax` command. Subcommands live in llm_jax/commands/, one module each.

Config flags follow the JAX convention: `--config=tiny[:variant]` picks a recipe (a shipped one by name,
`llm-jax recipes` lists them, or a file of your own) and `--config.section.key=value` overrides one key.
A user mistake ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
from typing import Sequence

from llm_jax import commands
from llm_jax.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag as a UserError (one line) instead of usage text plus exit."""

  def error(self, message):
    command = self.prog[len('llm-jax'):].strip()  # '' for the top level, 'train' for a subcommand
    raise UserError(f'{command}: {message}' if command else message)


def split_config_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` (or `--config.a.b v`) pairs from the flags argparse did not know."""
  overrides, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith('--config.'):
      raise UserError(f'unknown flag {arg}')
    key, eq, value = arg[len('--config.'):].partition('=')
    if not eq:
      if i + 1 >= len(extra):
        raise UserError(f'flag --config.{key} needs a value')
      value = extra[i + 1]
      i += 1
    if not key:
      raise UserError(f'flag {arg} names no config key')
    overrides.append((key, value))
    i += 1
  return overrides


def version() -> str:
  """`llm-jax 0.1.0 (jax 0.10.2, Python 3.11.7)`: the installed distributions' metadata, nothing imported."""
  def of(dist):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
      return 'unknown'
  return f'llm-jax {of("llm-jax")} (jax {of("jax")}, Python {platform.python_version()})'


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='llm-jax', description='Language models in JAX: train, evaluate, generate.')
  parser.add_argument('--version', action='version', version=version())
  sub = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
  for name in commands.NAMES:
    module = importlib.import_module(f'llm_jax.commands.{name}')
    p = sub.add_parser(name, help=module.HELP, description=module.HELP)
    module.add_arguments(p)
    p.set_defaults(run=module.run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args, extra = build_parser().parse_known_args(argv)
    return args.run(args, split_config_overrides(extra))
  except UserError as e:
    # One line, even when the message quotes something multi-line (a recipe's own exception, say).
    message = ' '.join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f'llm-jax: error: {message}', file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print('llm-jax: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
