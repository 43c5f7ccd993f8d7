"""Small pieces several commands share."""

from __future__ import annotations

import argparse
import json
import os

from llm_jax import atomic, storage
from llm_jax.errors import UserError

_RECIPE_HELP = ('NAME[:variant] of a shipped recipe (--config=list or `llm-jax recipes` lists them; default '
                'tiny) or FILE.py[:variant] of your own')


class _ConfigFlag(argparse.Action):
  """--config=SPEC; --config=list prints the shipped recipes and exits 0 while the flags are parsed, like
  --help, so that `llm-jax train --config=list` needs no --workdir."""

  def __call__(self, parser, namespace, values, option_string=None):
    if values == 'list':
      from llm_jax import recipes
      print(recipes.listing())
      parser.exit()
    setattr(namespace, self.dest, values)


def add_config_flag(p, also: str = '') -> None:
  """--config of every command that takes a recipe (llm_jax.recipes resolves the value)."""
  p.add_argument('--config', default=None, action=_ConfigFlag, help=_RECIPE_HELP + also)


def no_overrides(command: str, overrides) -> None:
  if overrides:
    raise UserError(f"{command} reads the run's own config; --config.* overrides are not accepted")


def nonempty(flag: str, value: str | None) -> None:
  """`--workdir=` (an unset shell variable, say) would otherwise mean the current directory."""
  if value is not None and not value.strip():
    raise UserError(f'{flag} is empty')


def check_output(flag: str, path: str | None) -> None:
  """An output file that cannot be written is reported before the work, not after it."""
  if path is None:
    return
  nonempty(flag, path)
  if storage.isdir(path):
    raise UserError(f'{flag}={path} is a directory')
  if storage.is_url(path):
    return  # an object store has no directories to be missing: the write makes the object's name
  parent = os.path.dirname(os.path.abspath(storage.local_path(path)))
  if not os.path.isdir(parent):
    raise UserError(f'{flag}={path}: directory {parent} does not exist')


def write_json(path: str, obj) -> None:
  """Write `obj` to `path` atomically: a failure leaves any previous file intact."""
  try:
    atomic.write_text(path, json.dumps(obj, indent=2) + '\n')
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror}') from None


def write_jsonl(path: str, records) -> None:
  """One JSON object per line, written atomically like `write_json`."""
  try:
    with atomic.replacing(path) as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + '\n')
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror or e}') from None


def add_retrieve_arguments(p) -> None:
  """--retrieve and --retrieve_k (generate, chat and serve)."""
  p.add_argument('--retrieve', default=None, metavar='INDEX_DIR',
                 help='put the passages of this index (`llm-jax index`) nearest to the prompt before it')
  p.add_argument('--retrieve_k', type=int, default=4, help='passages retrieved per prompt')


def check_retrieve(args) -> None:
  if args.retrieve is None:
    return
  nonempty('--retrieve', args.retrieve)
  if args.retrieve_k < 1:
    raise UserError(f'--retrieve_k={args.retrieve_k}: expected a positive integer')
  from llm_jax.retrieval import index
  index.read_manifest(args.retrieve, '--retrieve')  # a missing index fails before any model loads
