"""Small pieces several commands share."""

from __future__ import annotations

import json
import os

from llm_jax.errors import UserError


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
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f'{flag}={path} is a directory')
  if not os.path.isdir(parent):
    raise UserError(f'{flag}={path}: directory {parent} does not exist')


def write_json(path: str, obj) -> None:
  """Write `obj` to `path` atomically: a failure leaves any previous file intact."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)
      f.write('\n')
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror}') from None


def write_jsonl(path: str, records) -> None:
  """One JSON object per line, written atomically like `write_json`."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror}') from None


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
