"""Text sources: random-access collections of documents, split into train and held-out by a hash of each
document's name (stable across machines, runs and process counts).

- `builtin`: the Python standard library's own source files of the running interpreter, minus its test
  folders and minus machine-generated files. Real text nobody here wrote, present on every machine, no
  download.
- a glob of `.txt` files (one document per file) and/or `.jsonl` files (one document per line, the text
  in `data.text_field`).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import sysconfig
from typing import Sequence

from llm_jax.errors import UserError

SPLITS = ('train', 'heldout')
_TEST_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})
# A file that says in its first lines that a program wrote it (the code-page tables made by gencodec.py,
# pydoc's 750 kB topic dump, token.py, ...) is data, not code anyone wrote: code corpora such as The Stack
# drop such files. Left in, the topic dump alone is over half of the held-out bytes.
_GENERATED = re.compile(r'auto-?generated|automatically generated|generated\b[^\n]{0,80}\.py\b|do not edit',
                        re.IGNORECASE)


def in_heldout(name: str, heldout_percent: int) -> bool:
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') % 100 < heldout_percent


class Documents:
  """A random-access sequence of documents; `name(i)` says where document i came from."""

  def __init__(self, names: Sequence[str], loaders: Sequence):
    self._names = list(names)
    self._loaders = list(loaders)

  def __len__(self) -> int:
    return len(self._names)

  def __getitem__(self, i: int) -> str:
    return self._loaders[i]()

  def name(self, i: int) -> str:
    return self._names[i]


def _read_text(path: str) -> str:
  with open(path, 'rb') as f:
    data = f.read()
  # Invalid bytes become U+FFFD rather than ending the run; the tokenizer byte-falls-back on them.
  return data.decode('utf-8', errors='replace')


def is_generated(path: str) -> bool:
  with open(path, encoding='utf-8', errors='replace') as f:
    head = ''.join(f.readline() for _ in range(5))
  return bool(_GENERATED.search(head))


def builtin_files() -> list[tuple[str, str]]:
  """(name relative to the standard library, absolute path) of every hand-written, non-test .py file."""
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS)
    for fn in sorted(filenames):
      path = os.path.join(dirpath, fn)
      if fn.endswith('.py') and not is_generated(path):
        out.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return sorted(out)


def _jsonl_loader(path: str, offset: int, lineno: int, field: str):
  def load() -> str:
    with open(path, 'rb') as f:
      f.seek(offset)
      line = f.readline()
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
    if not isinstance(record, dict) or field not in record:
      raise UserError(f'{path}:{lineno}: record has no field {field!r}')
    text = record[field]
    if not isinstance(text, str):
      raise UserError(f'{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string')
    return text
  return load


def _jsonl_entries(path: str, field: str) -> list[tuple[str, object]]:
  entries = []
  offset = 0
  with open(path, 'rb') as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        entries.append((f'{path}:{lineno}', _jsonl_loader(path, offset, lineno, field)))
      offset += len(line)
  return entries


def open_source(data_cfg, split: str) -> Documents:
  """The documents of `split` ('train' or 'heldout') of the configured source."""
  if split not in SPLITS:
    raise ValueError(split)
  want_heldout = split == 'heldout'
  entries: list[tuple[str, object]] = []
  if data_cfg.source == 'builtin':
    for name, path in builtin_files():
      entries.append((name, lambda path=path: _read_text(path)))
  else:
    paths = sorted(globlib.glob(os.path.expanduser(data_cfg.source), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
      raise UserError(f'config key data.source={data_cfg.source!r}: the glob matches no files')
    for path in paths:
      if path.endswith('.jsonl'):
        try:
          entries.extend(_jsonl_entries(path, data_cfg.text_field))
        except OSError as e:
          raise UserError(f'cannot read {path}: {e.strerror}') from None
      elif path.endswith('.txt'):
        entries.append((path, lambda path=path: _read_text(path)))
      else:
        raise UserError(f'{path}: unsupported file type (expected .txt or .jsonl)')
  chosen = [(n, load) for n, load in entries if in_heldout(n, data_cfg.heldout_percent) == want_heldout]
  if not chosen:
    raise UserError(f'data.source={data_cfg.source!r} has no {split} documents '
                    f'({len(entries)} in all, data.heldout_percent={data_cfg.heldout_percent})')
  return Documents([n for n, _ in chosen], [load for _, load in chosen])
