"""Text sources: random-access collections of documents, each split into train and held-out.

A source is named by one string (`data.source`, or each entry of `data.mixture`):

- `builtin`: the Python standard library's own source files of the running interpreter, minus its test
  folders, machine-generated and empty files. Real text nobody here wrote, present on every machine.
- a glob of local files (files.py): `.txt`, `.jsonl` and their `.gz` forms.
- `tfds:NAME` or `tfds:DIR` (tfds_source.py): a TensorFlow Datasets dataset in ArrayRecord format, read
  by name from `data.tfds_data_dir` (a catalog dataset such as lm1b prepared there) or from a directory,
  such as one written by `llm-jax prepare` (whose records also carry the token ids).

Local sources are split by a hash of each document's name (stable across machines, runs and process
counts); TFDS sources use the dataset's own splits.

`documents[i]` is the text (str), pre-tokenized ids (int32 array, prepared datasets), or `Skipped` for a bad
record (never None); `documents.text(i)` is always the text (or `Skipped`).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import sysconfig
from typing import Iterator

from llm_jax.data import files, objectives
from llm_jax.data.files import Record, Skipped
from llm_jax.errors import UserError

SPLITS = ('train', 'heldout')
TFDS_PREFIX = 'tfds:'
_TEST_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})
# A file that says in its first lines that a program wrote it (the code-page tables made by gencodec.py,
# pydoc's 750 kB topic dump, token.py, ...) is data, not code anyone wrote: code corpora such as The Stack
# drop such files. Left in, the topic dump alone is over half of the held-out bytes.
_GENERATED = re.compile(r'auto-?generated|automatically generated|generated\b[^\n]{0,80}\.py\b|do not edit',
                        re.IGNORECASE)

__all__ = ['Skipped', 'open_source', 'source_specs', 'texts', 'in_heldout', 'builtin_files']


def in_heldout(name: str, heldout_percent: int) -> bool:
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') % 100 < heldout_percent


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
      if fn.endswith('.py') and os.path.getsize(path) > 0 and not is_generated(path):
        out.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return sorted(out)


def source_specs(data_cfg) -> list[tuple[str, float]]:
  """(source, weight) of every source the config reads: `data.mixture` if set, else `data.source`."""
  if data_cfg.mixture:
    return [(str(s), float(w)) for s, w in data_cfg.mixture]
  return [(data_cfg.source, 1.0)]


def glob_paths(pattern: str, key: str = 'data.source') -> list[str]:
  paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    where = 'the path does not exist' if not globlib.has_magic(pattern) else 'the glob matches no files'
    raise UserError(f'config key {key}={pattern!r}: {where}')
  for p in paths:
    files.kind_of(p)  # every file must be a kind we read: say which one is not, before any work
  return paths


def _open_one(spec: str, data_cfg, split: str, key: str):
  if spec.startswith(TFDS_PREFIX):
    from llm_jax.data import tfds_source  # tensorflow_datasets is imported only when asked for
    return tfds_source.open_tfds(spec[len(TFDS_PREFIX):], data_cfg, split, key)
  want_heldout = split == 'heldout'

  def select(name: str) -> bool:
    return in_heldout(name, data_cfg.heldout_percent) == want_heldout

  reads_records = objectives.of(data_cfg).chat
  if spec == 'builtin' and reads_records:
    raise UserError(f'{key}={spec!r}: data.objective={data_cfg.objective!r} reads JSONL records; give a glob '
                    'of .jsonl files')
  if spec == 'builtin':
    names, paths = zip(*builtin_files())
    docs = files.open_files(list(paths), 'file', data_cfg.text_field, data_cfg.max_doc_chars, select,
                            names=list(names), kind='txt')
  else:
    paths = glob_paths(spec, key)
    field = data_cfg.text_field
    if reads_records:
      field = None  # chat.py reads whole records
      for p in paths:
        if files.kind_of(p) != 'jsonl':
          raise UserError(f'{key}={spec!r}: {p} is not .jsonl; data.objective={data_cfg.objective!r} reads '
                          'JSONL records')
      # A record is one document: never cut into pieces (max_doc_chars is for running text).
      return _nonempty(files.open_files(paths, 'file', field, 1 << 62, select), key, spec, split, data_cfg)
    docs = files.open_files(paths, data_cfg.txt_mode, field, data_cfg.max_doc_chars, select)
  return _nonempty(docs, key, spec, split, data_cfg)


def _nonempty(docs, key: str, spec: str, split: str, data_cfg):
  if not len(docs):
    raise UserError(f'{key}={spec!r} has no {split} documents (data.heldout_percent='
                    f'{data_cfg.heldout_percent})')
  return docs


def open_sources(data_cfg, split: str) -> list[tuple[object, float]]:
  """(documents, weight) of each configured source, for `split` ('train' or 'heldout')."""
  if split not in SPLITS:
    raise ValueError(split)
  specs = source_specs(data_cfg)
  key = 'data.source' if not data_cfg.mixture else 'data.mixture'
  return [(_open_one(spec, data_cfg, split, key), w) for spec, w in specs]


class Interleaved:
  """Finite documents of several sources interleaved in proportion to their weights, every document once:
  a mixture's held-out set, read in order by evaluation."""

  def __init__(self, parts: list[tuple[object, float]]):
    order = []
    for p, (docs, w) in enumerate(parts):
      order.extend(((j + 0.5) / w, p, j) for j in range(len(docs)))
    order.sort()
    self._parts = [d for d, _ in parts]
    self._order = [(p, j) for _, p, j in order]

  def __len__(self) -> int:
    return len(self._order)

  def __getitem__(self, i: int):
    p, j = self._order[i]
    return self._parts[p][j]

  def text(self, i: int):
    p, j = self._order[i]
    return doc_text(self._parts[p], j)

  def name(self, i: int) -> str:
    p, j = self._order[i]
    return self._parts[p].name(j)


def open_source(data_cfg, split: str):
  """All documents of `split`: one source, or a mixture's sources interleaved by weight."""
  parts = open_sources(data_cfg, split)
  return parts[0][0] if len(parts) == 1 else Interleaved(parts)


def doc_text(docs, i: int):
  return docs.text(i) if hasattr(docs, 'text') else docs[i]


def texts(docs, limit_chars: int | None = None) -> Iterator[str]:
  """The texts of `docs` in order, bad records left out (for tokenizer training and evaluation)."""
  seen = 0
  for i in range(len(docs)):
    text = doc_text(docs, i)
    if isinstance(text, Record):
      text = text.text()
    if isinstance(text, str):
      yield text
      seen += len(text)
      if limit_chars is not None and seen >= limit_chars:
        return


def prepared_tokenizers(data_cfg) -> dict[str, bytes]:
  """spec -> tokenizer model of every prepared (pre-tokenized) TFDS source the config reads."""
  from llm_jax.data import tfds_source
  out = {}
  for spec, _ in source_specs(data_cfg):
    if spec.startswith(TFDS_PREFIX):
      builder = tfds_source.builder_for(spec[len(TFDS_PREFIX):], data_cfg, 'data.source')
      path = os.path.join(str(builder.data_dir), tfds_source.TOKENIZER_FILE)
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          out[spec] = f.read()
  return out
