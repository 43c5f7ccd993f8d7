"""Column stores as documents: Parquet files (`'data/*.parquet'`, the Hub's own format) and Hugging Face
datasets written by `datasets.save_to_disk` (`hf:DIR`). A document is one row; its text is the column
`data.text_field`.

Parquet is read one row group at a time (pyarrow), never a whole file: opening reads only the files'
footers, and each process keeps the text of its last few row groups (CACHED_GROUPS). The training shuffle
takes a shard's documents row group by row group (`groups`, mixture.EpochShuffle), in a fresh order every
epoch, so a row group is decoded about once per epoch and shard rather than once per document. A saved
HF dataset is memory-mapped Arrow: rows are read where they lie.

Splits: an HF DatasetDict's own (data.tfds_train_split, and for held-out data.tfds_heldout_split or the
first of heldout / validation / test); otherwise by a hash of each row's file (or dataset) base name and
number, the same wherever the data lies, or with too few rows for that the last heldout_percent% of each
row's text (as splitting.py does for text files).
"""

from __future__ import annotations

import collections
import os
import threading
import zlib

import numpy as np

from llm_jax.data import splitting
from llm_jax.data.files import Part, Skipped
from llm_jax.errors import UserError

HF_PREFIX = 'hf:'
CACHED_GROUPS = 16  # row groups kept decoded per process: every shard of a host reads its own


def _pq():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise UserError("Parquet sources need pyarrow: pip install 'llm-jax[tables]'") from None
  return pq


def _parquet_file(path: str):
  from llm_jax.data import remote
  return _pq().ParquetFile(remote.open_binary(path) if remote.is_url(path) else path)


def _text(raw, field: str, where: str):
  if raw is None:
    return Skipped(where, 'missing_field', f'field {field!r} is empty (null)')
  if isinstance(raw, bytes):
    try:
      raw = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      return Skipped(where, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason})')
  if not isinstance(raw, str):
    return Skipped(where, 'missing_field', f'field {field!r} is {type(raw).__name__}, expected a string')
  return raw if raw.strip() else Skipped(where, 'empty', 'empty document')


class ParquetDocuments:
  """Every row of `paths`, in file order. Picklable: a worker process opens its own readers."""

  def __init__(self, paths: list[str], field: str, key: str):
    self._paths, self._field = paths, field
    counts, groups = [], []
    for f, path in enumerate(paths):
      try:
        meta = _parquet_file(path).metadata
      except OSError as e:
        raise UserError(f'cannot read {path}: {e}') from None
      except Exception as e:  # pyarrow.ArrowInvalid: not a Parquet file
        raise UserError(f'{path}: not a valid Parquet file ({e})') from None
      names = meta.schema.to_arrow_schema().names
      if field not in names:
        raise UserError(f'{key}: {path} has no column {field!r} (config key data.text_field; it has '
                        f'{", ".join(names)})')
      for g in range(meta.num_row_groups):
        counts.append(meta.row_group(g).num_rows)
        groups.append((f, g))
    self._groups = groups  # (file, row group in it) of each global row group
    self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    self.groups = np.repeat(np.arange(len(counts)), counts)  # global row group of each document
    self._readers: dict = {}
    self._cache: collections.OrderedDict = collections.OrderedDict()
    # Shards read by different threads (workers.py) share this table: its readers and cache change together.
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, '_readers': {}, '_cache': collections.OrderedDict(), '_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self) -> int:
    return int(self._starts[-1])

  def parts(self):
    """(file base name, first row, end row) of each file."""
    ends = {}
    for g, (f, _) in enumerate(self._groups):
      ends[f] = int(self._starts[g + 1])
    start = 0
    for f, path in enumerate(self._paths):
      stop = ends.get(f, start)
      yield os.path.basename(path), start, stop
      start = stop

  def _locate(self, i: int) -> tuple[int, int]:
    g = int(np.searchsorted(self._starts, i, side='right')) - 1
    return g, i - int(self._starts[g])

  def name(self, i: int) -> str:
    g, row = self._locate(i)
    f, fg = self._groups[g]
    return f'{self._paths[f]}:row group {fg}:row {row}'

  def _column(self, g: int) -> list:
    with self._lock:
      return self._column_locked(g)

  def _column_locked(self, g: int) -> list:
    column = self._cache.get(g)
    if column is None:
      f, fg = self._groups[g]
      reader = self._readers.get(f)
      if reader is None:
        reader = self._readers[f] = _parquet_file(self._paths[f])
      column = reader.read_row_group(fg, columns=[self._field]).column(0).to_pylist()
      self._cache[g] = column
      while len(self._cache) > CACHED_GROUPS:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(g)
    return column

  def __getitem__(self, i: int):
    g, row = self._locate(i)
    try:
      raw = self._column(g)[row]
    except OSError as e:
      return Skipped(self.name(i), 'unreadable', f'cannot read: {e.strerror or e}')
    except Exception as e:  # a damaged row group: skip its rows, say why
      return Skipped(self.name(i), 'unreadable', f'cannot read row group: {type(e).__name__}: {e}')
    return _text(raw, self._field, self.name(i))


class HFDocuments:
  """One split of a dataset saved by `datasets.save_to_disk`, memory-mapped. Picklable."""

  def __init__(self, directory: str, split: str | None, field: str, key: str):
    self._dir, self._split, self._field = directory, split, field
    self._ds = None
    ds = self._open()
    if field not in ds.column_names:
      raise UserError(f'{key}: hf:{directory} has no column {field!r} (config key data.text_field; it has '
                      f'{", ".join(ds.column_names)})')
    self._len = len(ds)

  def __getstate__(self):
    return {**self.__dict__, '_ds': None}

  def _open(self):
    if self._ds is None:
      ds = _load(self._dir)
      self._ds = (ds[self._split] if self._split else ds).select_columns([self._field])
    return self._ds

  def __len__(self) -> int:
    return self._len

  def parts(self):
    yield os.path.basename(os.path.normpath(self._dir)), 0, self._len

  def name(self, i: int) -> str:
    return f'hf:{self._dir}' + (f'[{self._split}]' if self._split else '') + f'[{i}]'

  def __getitem__(self, i: int):
    try:
      raw = self._open()[int(i)][self._field]
    except Exception as e:  # a damaged Arrow file: skip the row, say why
      return Skipped(self.name(i), 'unreadable', f'cannot read row: {type(e).__name__}: {e}')
    return _text(raw, self._field, self.name(i))


def _load(directory: str):
  try:
    import datasets
  except ImportError:
    raise UserError("hf: sources need the datasets library: pip install 'llm-jax[tables]'") from None
  try:
    return datasets.load_from_disk(directory)
  except FileNotFoundError as e:
    raise UserError(f'hf:{directory} is not a dataset saved with datasets.save_to_disk ({e})') from None


class Selected:
  """The rows `indices` of a table source, only `part` of each row's text when given."""

  def __init__(self, base, indices: np.ndarray, part: Part | None):
    self._base, self._indices, self._part = base, indices, part
    base_groups = getattr(base, 'groups', None)
    if base_groups is not None:
      self.groups = base_groups[indices]

  def __len__(self) -> int:
    return len(self._indices)

  def name(self, i: int) -> str:
    return self._base.name(int(self._indices[i])) + (self._part.label() if self._part else '')

  def __getitem__(self, i: int):
    text = self._base[int(self._indices[i])]
    if isinstance(text, Skipped) or self._part is None:
      return text
    cut = self._part.cut(len(text))
    text = text[:cut] if self._part.side == 'head' else text[cut:]
    return text if text.strip() else Skipped(self.name(i), 'empty', 'empty document')


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a well-spread 64-bit hash of each integer, vectorized."""
  x = x.astype(np.uint64)
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def heldout_mask(base, percent: int) -> np.ndarray:
  """Which rows are held out: a hash of (the file's or dataset's base name, the row's number in it), so
  the split is the same wherever the data lies; computed for all rows at once (millions in a second)."""
  keys = np.empty(len(base), np.uint64)
  for label, start, stop in base.parts():
    salt = zlib.crc32(label.encode('utf-8'))
    keys[start:stop] = _mix64(np.arange(stop - start, dtype=np.uint64) + (np.uint64(salt) << np.uint64(32)))
  return _mix64(keys) % np.uint64(100) < np.uint64(percent)


def select(base, split: str, percent: int):
  """(the rows of `split`, whether they were chosen by document), as splitting.plan chooses for files."""
  held = heldout_mask(base, percent)
  n = len(base)
  if percent == 0 or (n * percent >= splitting.EXPECTED_HELDOUT * 100 and 0 < held.sum() < n):
    return Selected(base, np.flatnonzero(held == (split == 'heldout')), None), True
  return Selected(base, np.arange(n), Part('tail' if split == 'heldout' else 'head', percent)), False


def open_hf(directory: str, data_cfg, split: str, key: str, whole: bool):
  """`split` of hf:DIR: a DatasetDict's own split, or a single dataset split like a file source."""
  from llm_jax.data import tfds_source
  if '://' not in directory and not os.path.isdir(directory):
    raise UserError(f'{key}: hf:{directory}: the directory does not exist')
  ds = _load(directory)
  splits = list(ds.keys()) if hasattr(ds, 'keys') else None
  if splits is None:
    docs = HFDocuments(directory, None, data_cfg.text_field, key)
    return select(docs, 'train' if whole else split, 0 if whole else data_cfg.heldout_percent)
  want = data_cfg.tfds_train_split if split == 'train' else data_cfg.tfds_heldout_split
  candidates = (want,) if want else tfds_source.HELDOUT_CANDIDATES
  for c in candidates:
    if c in splits:
      return HFDocuments(directory, c, data_cfg.text_field, key), True
  which = 'data.tfds_train_split' if split == 'train' else 'data.tfds_heldout_split'
  raise UserError(f'{key}: hf:{directory} has no split {want or " / ".join(candidates)!r} for {split} (config key '
                  f'{which}; it has {", ".join(splits)})')
