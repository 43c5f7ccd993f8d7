"""Text sources: random-access collections of documents, each split into train and held-out.

A source is named by one string (`data.source`, or each entry of `data.mixture`):

- `builtin`: the Python standard library's own source files of the running interpreter, minus its test
  folders, machine-generated and empty files. Real text nobody here wrote, present on every machine.
- a glob of local files (files.py): `.txt`, `.jsonl` and their `.gz` forms.
- `tfds:NAME` or `tfds:DIR` (tfds_source.py): a TensorFlow Datasets dataset in ArrayRecord format, read
  by name from `data.tfds_data_dir` (a catalog dataset such as lm1b prepared there) or from a directory,
  such as one written by `llm-jax prepare` (whose records also carry the token ids).

Local sources are split by a hash of each document's name, or when they have too few documents for that
by position (splitting.py); TFDS sources use the dataset's own splits. `data.heldout_source` names a
held-out source of its own: then every document of data.source trains.

`documents[i]` is the text (str), pre-tokenized ids (int32 array, prepared datasets), or `Skipped` for a bad
record (never None); `documents.text(i)` is always the text (or `Skipped`).
"""

from __future__ import annotations

import glob as globlib
import os
import re
import sys
import sysconfig
from typing import Iterator

from llm_jax.data import files, objectives, remote, splitting, tables
from llm_jax.data.files import Record, Skipped
from llm_jax.data.splitting import in_heldout
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
  if remote.is_url(pattern):
    paths = remote.glob(pattern)
  else:
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    where = 'the path does not exist' if not globlib.has_magic(pattern) else 'the glob matches no files'
    raise UserError(f'config key {key}={pattern!r}: {where}')
  parquet = [p.endswith('.parquet') for p in paths]
  if any(parquet) and not all(parquet):
    raise UserError(f'config key {key}={pattern!r} matches Parquet and other files: give them as two sources '
                    '(data.mixture)')
  for p in paths:
    if not p.endswith('.parquet'):
      files.kind_of(p)  # every file must be a kind we read: say which one is not, before any work
  return paths


def _open_one(spec: str, data_cfg, split: str, key: str, whole: bool = False):
  """`split` of the source `spec`; with `whole`, every document (a held-out source, or data.source beside
  one)."""
  if spec.startswith(TFDS_PREFIX):
    from llm_jax.data import tfds_source  # tensorflow_datasets is imported only when asked for
    return tfds_source.open_tfds(spec[len(TFDS_PREFIX):], data_cfg, split, key)
  chat = objectives.of(data_cfg).chat
  if spec.startswith(tables.HF_PREFIX) or (spec != 'builtin' and glob_paths(spec, key)[0].endswith('.parquet')):
    return _open_table(spec, data_cfg, split, key, whole, chat)
  if spec == 'builtin' and chat:
    raise UserError(f'{key}={spec!r}: data.objective={data_cfg.objective!r} reads JSONL records; give a glob '
                    'of .jsonl files')
  if spec == 'builtin':
    names, paths = (list(x) for x in zip(*builtin_files()))
    found = [files.index_file(p, 'file', 'txt') for p in paths]
  else:
    names, paths = None, glob_paths(spec, key)
    if chat:
      for p in paths:
        if files.kind_of(p) != 'jsonl':
          raise UserError(f'{key}={spec!r}: {p} is not .jsonl; data.objective={data_cfg.objective!r} reads '
                          'JSONL records')
    found = [files.index_file(p, 'file' if chat else data_cfg.txt_mode) for p in paths]
  percent = 0 if whole else data_cfg.heldout_percent
  # A chat record is one document: never cut into pieces (max_doc_chars is for running text).
  rows, part, by_document = splitting.plan(found, names, 'train' if whole else split, percent,
                                           data_cfg.max_doc_chars, data_cfg.shards if split == 'train' else 0,
                                           whole_records=chat)
  docs = files.FileDocuments(found, rows, None if chat else data_cfg.text_field, names, part,
                             data_cfg.encoding, data_cfg.decode_errors)
  if not by_document:  # said by require_texts, once the source is known to hold text
    how = 'its last documents are' if chat else f'the last {percent}% of each is'
    n = sum(len(f.starts) for f in found)
    docs.note = (f'{key}={spec!r} has {n} document{"s" if n != 1 else ""}, too few to hold out whole ones '
                 f'(data.heldout_percent={percent}): {how} held out, by position')
  if not len(docs):
    raise UserError(f'{key}={spec!r} has no {split} documents (data.heldout_percent={percent})')
  return docs


def _open_table(spec: str, data_cfg, split: str, key: str, whole: bool, chat: bool):
  if chat:
    raise UserError(f'{key}={spec!r}: data.objective={data_cfg.objective!r} reads JSONL records; give a glob '
                    'of .jsonl files')
  if spec.startswith(tables.HF_PREFIX):
    docs, by_document = tables.open_hf(os.path.expanduser(spec[len(tables.HF_PREFIX):]), data_cfg, split, key,
                                       whole)
  else:
    base = tables.ParquetDocuments(glob_paths(spec, key), data_cfg.text_field, key)
    docs, by_document = tables.select(base, 'train' if whole else split, 0 if whole else data_cfg.heldout_percent)
  if not by_document:
    p, n = data_cfg.heldout_percent, len(docs)
    docs.note = (f'{key}={spec!r} has {n} row{"s" if n != 1 else ""}, too few to hold out whole ones '
                 f'(data.heldout_percent={p}): the last {p}% of each is held out, by position')
  if not len(docs):
    raise UserError(f'{key}={spec!r} has no {split} documents (data.heldout_percent={data_cfg.heldout_percent})')
  return docs


_SAID: set[str] = set()


def _note(line: str) -> None:
  """Said once per process: the training and held-out splits (and the tokenizer) open a source apart."""
  if line not in _SAID:
    _SAID.add(line)
    print(f'llm-jax: note: {line}', file=sys.stderr, flush=True)


def open_sources(data_cfg, split: str) -> list[tuple[object, float]]:
  """(documents, weight) of each configured source, for `split` ('train' or 'heldout')."""
  if split not in SPLITS:
    raise ValueError(split)
  if data_cfg.heldout_source and split == 'heldout':
    return [(_open_one(data_cfg.heldout_source, data_cfg, split, 'data.heldout_source', whole=True), 1.0)]
  specs = source_specs(data_cfg)
  key = 'data.source' if not data_cfg.mixture else 'data.mixture'
  whole = bool(data_cfg.heldout_source)
  return [(_open_one(spec, data_cfg, split, key, whole), w) for spec, w in specs]


def open_whole(data_cfg, spec: str, key: str = 'data.source'):
  """Every document of `spec`, none cut by a split (`llm-jax eval --data`); a TFDS source's held-out split."""
  return _open_one(spec, data_cfg, 'heldout', key, whole=True)


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


def require_text(docs, label: str) -> None:
  """Stops with one line when not one document of `docs` is usable (every file unreadable, empty, binary or
  not text in data.encoding): before training, so nothing is written. Reads up to the first usable one."""
  if getattr(docs, 'sequential', False):  # a stream: reading ahead here would cost a pass
    return
  failed: dict[str, str] = {}  # file (or record) -> why its first document could not be used
  for i in range(len(docs)):
    item = doc_text(docs, i)
    if not isinstance(item, Skipped):
      return
    if not item.silent:
      failed.setdefault(docs.file_name(i) if hasattr(docs, 'file_name') else item.where, item.reason)
  tried = len(docs.files) if hasattr(docs, 'files') else len(docs)
  what = 'files' if hasattr(docs, 'files') else 'documents'
  first = '; '.join(f'{where}: {why}' for where, why in list(failed.items())[:3])
  raise UserError(f'{label} has no usable text: {tried} {what} tried, none readable as text'
                  + (f' ({first}{"; ..." if len(failed) > 3 else ""})' if first else ''))


def require_texts(data_cfg, parts) -> None:
  key = 'data.source' if not data_cfg.mixture else 'data.mixture'
  specs = source_specs(data_cfg)
  for (docs, _), (spec, _) in zip(parts, specs):
    require_text(docs, f'{key}={spec!r}')
  for docs, _ in parts:
    if getattr(docs, 'note', None):
      _note(docs.note)


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
