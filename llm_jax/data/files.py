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

from llm_jax.data import remote
from llm_jax.errors import UserError

SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')
TXT_MODES = ('file', 'blocks')
DECODE_ERRORS = ('strict', 'replace', 'ignore')  # data.decode_errors: Python's own error handlers
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


def _open_binary(path: str):
  return remote.open_binary(path) if remote.is_url(path) else open(path, 'rb')


def _read_all(path: str) -> bytes:
  try:
    with _open_binary(path) as f:
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
        size = remote.size(path) if remote.is_url(path) else os.path.getsize(path)
        with _open_binary(path):  # unreadable files are found now, not hours into the run
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


# The last piece of a .jsonl record reaches to here: its length is counted in bytes of the line, its text in
# characters, and a character is never shorter than a byte.
_TO_END = 1 << 62


@dataclasses.dataclass(frozen=True)
class Part:
  """Which part of every record a source keeps when its documents are too few to hold out whole ones:
  the first (100 - percent)% ('head', training) or the last percent% ('tail', held out), by position."""
  side: str  # 'head' or 'tail'
  percent: int

  def cut(self, size: int) -> int:
    """Where the tail of a record of `size` units starts (the same point on both sides of the split)."""
    return size - -(-size * self.percent // 100)

  def label(self) -> str:
    return f' (first {100 - self.percent}%)' if self.side == 'head' else f' (last {self.percent}%)'


class FileDocuments:
  """Documents drawn from `files`, each a row (file, record, lo, hi, piece, pieces): bytes [lo, hi) of the
  file for .txt, characters [lo, hi) of the record's text (after `part`) for .jsonl. Picklable: a worker
  process gets the index, not the (cached, decompressed) file contents."""

  def __init__(self, files: list[_File], rows: np.ndarray, text_field: str, names: list[str] | None = None,
               part: Part | None = None, encoding: str = 'utf-8', errors: str = 'strict'):
    self._files = files
    self._rows = rows  # [N, 6] int64
    self._field = text_field
    self._names = names  # display names per file (the built-in corpus uses stdlib-relative paths)
    self._part = part
    self._encoding, self._errors = encoding, errors
    self._gz_cache: dict[str, bytes] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_gz_cache'] = {}
    return state

  def __len__(self) -> int:
    return len(self._rows)

  @property
  def files(self) -> list[_File]:
    return self._files

  def _file_name(self, f: int) -> str:
    return self._names[f] if self._names else self._files[f].path

  def file_name(self, i: int) -> str:
    return self._file_name(int(self._rows[i][0]))

  def name(self, i: int) -> str:
    f, r, _, _, piece, pieces = (int(x) for x in self._rows[i])
    line = int(self._files[f].lines[r])
    base = self._file_name(f) + (f':{line}' if line else '')
    base += self._part.label() if self._part else ''
    return base + (f' (piece {piece + 1} of {pieces})' if pieces > 1 else '')

  def _bytes(self, f: int, start: int, end: int) -> bytes:
    file = self._files[f]
    if file.path.endswith('.gz'):
      data = self._gz_cache.get(file.path)
      if data is None:
        data = self._gz_cache[file.path] = _read_all(file.path)
      return data[start:end]
    with _open_binary(file.path) as fh:
      fh.seek(start)
      return fh.read(end - start)

  def _decode(self, raw: bytes, where: str):
    try:
      return raw.decode(self._encoding, self._errors)
    except UnicodeDecodeError as e:
      if self._encoding.replace('-', '').lower() == 'utf8':
        return Skipped(where, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason}; data.encoding, '
                       'data.decode_errors=replace keep such files)')
      return Skipped(where, 'bad_encoding', f'not valid {self._encoding} at byte {e.start} ({e.reason})')

  def __getitem__(self, i: int):
    """The text of document i, or `Skipped` for a bad record (or `nothing()` for an empty last piece)."""
    f, r, lo, hi, piece, pieces = (int(x) for x in self._rows[i])
    file = self._files[f]
    where = self.name(i)
    start, end = int(file.starts[r]), int(file.ends[r])
    try:
      if file.kind == 'txt' and (lo > start or hi < end):
        # Cut on bytes, moved forward to the next character boundary so no character is split or doubled.
        raw = self._bytes(f, lo, min(end, hi + 4))
        raw = raw[_utf8_start(raw, 0) if lo > start else 0:_utf8_start(raw, hi - lo) if hi < end else None]
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
      if self._part is not None:
        cut = self._part.cut(len(text))
        text = text[:cut] if self._part.side == 'head' else text[cut:]
      text = text[lo:hi]
      if not text and pieces > 1:
        return nothing(where)  # pieces are counted in bytes, characters can run out first
    else:
      text = self._decode(raw, where)
      if isinstance(text, Skipped):
        return text
    if not text.strip():
      return Skipped(where, 'empty', 'empty document')
    return text

  def _json_text(self, raw: bytes, where: str):
    text = self._decode(raw, where)
    if isinstance(text, Skipped):
      return text
    try:
      record = json.loads(text)
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


def record_names(files: list[_File], names: list[str] | None = None) -> list[tuple[int, int, str]]:
  """(file, record, name) of every record: the name the split by document hashes."""
  out = []
  for f, file in enumerate(files):
    base = names[f] if names else file.path
    for r in range(len(file.starts)):
      line = int(file.lines[r])
      out.append((f, r, f'{base}:{line}' if line else base))
  return out


def ranges(files: list[_File], records, part: Part | None = None) -> list[tuple[int, int, int, int]]:
  """(file, record, lo, hi) of each of `records` ((file, record) pairs), only `part` of each when given:
  absolute bytes for .txt, a length in units of the line's bytes for .jsonl (lo 0)."""
  out = []
  for f, r in records:
    file = files[f]
    start, end = int(file.starts[r]), int(file.ends[r])
    if file.kind == 'txt':
      if part is not None:
        cut = start + part.cut(end - start)
        start, end = (start, cut) if part.side == 'head' else (cut, end)
      out.append((f, r, start, end))
    else:
      size = end - start
      if part is not None:
        size = part.cut(size) if part.side == 'head' else size - part.cut(size)
      out.append((f, r, 0, size))
  return out


def cut(files: list[_File], spans, piece: int) -> np.ndarray:
  """Rows (file, record, lo, hi, piece, pieces): each span cut into pieces of at most `piece` units."""
  rows = []
  for f, r, lo, hi in spans:
    pieces = max(1, -(-(hi - lo) // piece))
    last = hi if files[f].kind == 'txt' else _TO_END
    rows.extend((f, r, lo + j * piece, lo + (j + 1) * piece if j < pieces - 1 else last, j, pieces)
                for j in range(pieces))
  return np.asarray(rows, np.int64).reshape(-1, 6)


def open_files(paths: list[str], txt_mode: str, text_field: str, max_doc_chars: int, select,
               names: list[str] | None = None, kind: str | None = None) -> FileDocuments:
  """Documents of `paths` whose names `select(name)` accepts, long ones cut into pieces. `kind` ('txt')
  reads files of any suffix as text (the built-in corpus's .py files)."""
  files = [index_file(p, txt_mode, kind) for p in paths]
  chosen = [(f, r) for f, r, name in record_names(files, names) if select(name)]
  return FileDocuments(files, cut(files, ranges(files, chosen), max_doc_chars), text_field, names)
