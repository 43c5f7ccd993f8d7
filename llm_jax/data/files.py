"""Local text files as documents: `.txt` (one document per file, or per block of lines between blank lines),
`.jsonl` (one document per line, the text in a named field), and their gzip-compressed forms.

Opening lists the documents as byte ranges (one pass over `.jsonl` and block-mode `.txt` files; plain
one-per-file `.txt` needs only a stat), so reading document i later is one seek and one read, from any
process, in any order. Gzip has no random access: a `.gz` file is decompressed into memory the first time
a process touches it (see README: prepare large corpora with `llm-jax prepare` instead).

A bad record is not an error: reading it returns `Skipped` (file, line and why), which the pipeline counts
and logs. Missing or unreadable files found while listing are errors: the run cannot be what was asked.
Documents longer than `max_doc_chars` are cut into pieces of that size (by bytes for .txt, by characters
for .jsonl), each a document of its own, so one 100 MB line never becomes one 100 MB tokenizer call.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib

import numpy as np

from llm_jax.errors import UserError

SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')
TXT_MODES = ('file', 'blocks')
_BINARY_SNIFF = 8192  # bytes looked at for NUL, as git does to call a file binary



@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that is not a usable document; `kind` is the counter it goes under."""
  where: str
  kind: str
  reason: str

  def message(self) -> str:
    return f'{self.where}: {self.reason}'

  @property
  def silent(self) -> bool:
    return self.kind == 'nothing'


@dataclasses.dataclass(frozen=True)
class Record:
  """A whole .jsonl record (a dict), read when the objective needs more than one text field (chat.py)."""
  where: str
  fields: dict

  def text(self) -> str:
    """Its strings, one per line (what a tokenizer is trained on)."""
    out = []

    def walk(v):
      if isinstance(v, str):
        out.append(v)
      elif isinstance(v, dict):
        for x in v.values():
          walk(x)
      elif isinstance(v, list):
        for x in v:
          walk(x)
    walk(self.fields)
    return '\n'.join(out)


def nothing(where: str = '') -> Skipped:
  """Not a bad record, just no document here (an empty last piece, a document the objective declines).
  Never None: grain drops None elements, which would shift every later index."""
  return Skipped(where, 'nothing', '')


def kind_of(path: str) -> str:
  for suffix in SUFFIXES:
    if path.endswith(suffix):
      return suffix.split('.')[1]  # 'txt' or 'jsonl'
  raise UserError(f'{path}: unsupported file type (expected one of {", ".join(SUFFIXES)})')


def _read_all(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      data = f.read()
    return gzip.decompress(data) if path.endswith('.gz') else data
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: catch it first
    raise UserError(f'{path}: not a valid gzip file ({e})') from None
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}') from None


def _jsonl_ranges(data: bytes):
  """(start, end, line) of each non-blank line."""
  starts, ends, lines = [], [], []
  pos = 0
  for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
    if line.strip():
      starts.append(pos)
      ends.append(pos + len(line))
      lines.append(lineno)
    pos += len(line)
  return starts, ends, lines


def _block_ranges(data: bytes):
  """(start, end, first line) of each run of non-blank lines."""
  starts, ends, lines = [], [], []
  pos, start = 0, None
  for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
    if line.strip():
      if start is None:
        start = pos
        lines.append(lineno)
      end = pos + len(line)
    elif start is not None:
      starts.append(start)
      ends.append(end)
      start = None
    pos += len(line)
  if start is not None:
    starts.append(start)
    ends.append(end)
  return starts, ends, lines


@dataclasses.dataclass
class _File:
  path: str
  kind: str  # 'txt' or 'jsonl'
  starts: np.ndarray  # int64 byte offsets of each record
  ends: np.ndarray
  lines: np.ndarray  # 1-based line of each record; 0 for a whole-file document


def index_file(path: str, txt_mode: str, kind: str | None = None) -> _File:
  """List one file's records. Reads the file unless it is a whole-file .txt document."""
  kind = kind or kind_of(path)
  if kind == 'txt' and txt_mode == 'file':
    if path.endswith('.gz'):
      size = len(_read_all(path))
    else:
      try:
        size = os.path.getsize(path)
        with open(path, 'rb'):  # unreadable files are found now, not hours into the run
          pass
      except OSError as e:
        raise UserError(f'cannot read {path}: {e.strerror or e}') from None
    ranges = ([0], [size], [0])
  else:
    data = _read_all(path)
    ranges = _jsonl_ranges(data) if kind == 'jsonl' else _block_ranges(data)
  starts, ends, lines = (np.asarray(r, np.int64) for r in ranges)
  return _File(path, kind, starts, ends, lines)


def _utf8_start(data: bytes, i: int) -> int:
  """The first index >= i that starts a UTF-8 character (continuation bytes are 0b10xxxxxx)."""
  while i < len(data) and (data[i] & 0xC0) == 0x80:
    i += 1
  return i


class FileDocuments:
  """Documents drawn from `files`, selected by (file, record, piece) rows. Picklable: a worker process
  gets the index, not the (cached, decompressed) file contents."""

  def __init__(self, files: list[_File], rows: np.ndarray, text_field: str, max_doc_chars: int,
               names: list[str] | None = None):
    self._files = files
    self._rows = rows  # [N, 4] int64: file, record, piece, pieces
    self._field = text_field
    self._max = max_doc_chars
    self._names = names  # display names per file (the built-in corpus uses stdlib-relative paths)
    self._gz_cache: dict[str, bytes] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_gz_cache'] = {}
    return state

  def __len__(self) -> int:
    return len(self._rows)

  def _file_name(self, f: int) -> str:
    return self._names[f] if self._names else self._files[f].path

  def name(self, i: int) -> str:
    f, r, piece, pieces = (int(x) for x in self._rows[i])
    line = int(self._files[f].lines[r])
    base = self._file_name(f) + (f':{line}' if line else '')
    return base + (f' (piece {piece + 1} of {pieces})' if pieces > 1 else '')

  def _bytes(self, f: int, start: int, end: int) -> bytes:
    file = self._files[f]
    if file.path.endswith('.gz'):
      data = self._gz_cache.get(file.path)
      if data is None:
        data = self._gz_cache[file.path] = _read_all(file.path)
      return data[start:end]
    with open(file.path, 'rb') as fh:
      fh.seek(start)
      return fh.read(end - start)

  def __getitem__(self, i: int):
    """The text of document i, or `Skipped` for a bad record (or `nothing()` for an empty last piece)."""
    f, r, piece, pieces = (int(x) for x in self._rows[i])
    file = self._files[f]
    where = self.name(i)
    start, end = int(file.starts[r]), int(file.ends[r])
    try:
      if file.kind == 'txt' and pieces > 1:
        # Cut on bytes, moved forward to the next character boundary so no character is split or doubled.
        lo, hi = start + piece * self._max, min(end, start + (piece + 1) * self._max)
        raw = self._bytes(f, lo, min(end, hi + 4))
        raw = raw[_utf8_start(raw, 0) if piece else 0:_utf8_start(raw, hi - lo) if hi < end else None]
      else:
        raw = self._bytes(f, start, end)
    except OSError as e:
      return Skipped(where, 'unreadable', f'cannot read: {e.strerror or e}')
    if b'\0' in raw[:_BINARY_SNIFF]:
      return Skipped(where, 'binary', 'binary data (NUL bytes), not text')
    if file.kind == 'jsonl':
      text = self._json_text(raw, where)
      if isinstance(text, (Skipped, Record)):
        return text
      if pieces > 1:
        text = text[piece * self._max:(piece + 1) * self._max]
        if not text:
          return nothing(where)  # pieces are counted in bytes, characters can run out first
    else:
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        return Skipped(where, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason})')
    if not text.strip():
      return Skipped(where, 'empty', 'empty document')
    return text

  def _json_text(self, raw: bytes, where: str):
    try:
      record = json.loads(raw)
    except UnicodeDecodeError as e:
      return Skipped(where, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason})')
    except json.JSONDecodeError as e:
      return Skipped(where, 'bad_json', f'not valid JSON ({e.msg}, column {e.colno})')
    except RecursionError:
      return Skipped(where, 'bad_json', 'not valid JSON (nested too deeply)')
    if self._field is None:  # the objective reads whole records
      if not isinstance(record, dict):
        return Skipped(where, 'missing_field', f'record is a {type(record).__name__}, expected an object')
      return Record(where, record)
    if not isinstance(record, dict) or self._field not in record:
      return Skipped(where, 'missing_field', f'record has no field {self._field!r} (data.text_field)')
    text = record[self._field]
    if not isinstance(text, str):
      return Skipped(where, 'missing_field',
                     f'field {self._field!r} is {type(text).__name__}, expected a string')
    return text


def open_files(paths: list[str], txt_mode: str, text_field: str, max_doc_chars: int, select,
               names: list[str] | None = None, kind: str | None = None) -> FileDocuments:
  """Documents of `paths` whose names `select(name)` accepts, long ones cut into pieces. `kind` ('txt')
  reads files of any suffix as text (the built-in corpus's .py files)."""
  files = [index_file(p, txt_mode, kind) for p in paths]
  rows = []
  for f, file in enumerate(files):
    base = names[f] if names else file.path
    for r in range(len(file.starts)):
      line = int(file.lines[r])
      if not select(f'{base}:{line}' if line else base):
        continue
      size = int(file.ends[r] - file.starts[r])
      pieces = max(1, -(-size // max_doc_chars))
      rows.extend((f, r, j, pieces) for j in range(pieces))
  return FileDocuments(files, np.asarray(rows, np.int64).reshape(-1, 4), text_field, max_doc_chars, names)
