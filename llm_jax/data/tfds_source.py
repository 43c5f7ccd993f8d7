"""TensorFlow Datasets, without TensorFlow: ArrayRecord datasets read with `tfds.data_source` (random access),
and the builder `llm-jax prepare` writes them with.

`tfds:NAME` reads a dataset by name from `data.tfds_data_dir` (tfds' default when empty): a catalog dataset
a user prepared there in array_record format (lm1b, c4, ...), or one `llm-jax prepare` wrote. `tfds:DIR`
reads the dataset in a directory (a data_dir holding one dataset, or the dataset's version folder).
Documents are the records' `data.text_field`; a prepared dataset's records also hold `ids`, the token ids
of that text under the tokenizer saved beside them (TOKENIZER_FILE), so training reads ids and never
tokenizes. Where TensorFlow is installed (extra [tf]), a tfrecord-only dataset is streamed with
`tfds.load` instead (streaming.py).
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np

from llm_jax.data.files import Skipped
from llm_jax.errors import UserError

TOKENIZER_FILE = 'llm_jax_tokenizer.model'
HELDOUT_CANDIDATES = ('heldout', 'validation', 'test')


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError("TFDS sources need tensorflow-datasets: pip install 'llm-jax[tfds]'") from None
  return tfds


def find_version_dir(path: str) -> str | None:
  """The folder holding dataset_info.json: `path` itself, its one version folder, or its one dataset."""
  for pattern in ('', '*', os.path.join('*', '*')):
    found = sorted(glob.glob(os.path.join(path, pattern, 'dataset_info.json')))
    if len(found) == 1:
      return os.path.dirname(found[0])
    if len(found) > 1:
      raise UserError(f'{path} holds {len(found)} TFDS datasets; name one of: '
                      + ', '.join(os.path.relpath(os.path.dirname(f), path) for f in found))
  return None


def builder_for(name_or_dir: str, data_cfg, key: str):
  tfds = _tfds()
  if os.path.isdir(name_or_dir):
    version_dir = find_version_dir(name_or_dir)
    if version_dir is None:
      raise UserError(f'{key}: {name_or_dir} is not a TFDS dataset directory (no dataset_info.json)')
    return tfds.builder_from_directory(version_dir)
  data_dir = data_cfg.tfds_data_dir or None
  try:
    builder = tfds.builder(name_or_dir, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, a catalog module failing to import, a bad version, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'{key}: tfds:{name_or_dir}: {first}') from None
  if not builder.is_prepared():
    raise UserError(f'{key}: tfds:{name_or_dir} is not prepared in {builder.data_dir} (set data.tfds_data_dir '
                    'to where it was prepared with file_format=array_record, or run `llm-jax prepare`)')
  return builder


def split_name(builder, data_cfg, split: str, key: str) -> str:
  available = list(builder.info.splits.keys())
  if split == 'train':
    want = data_cfg.tfds_train_split
    candidates = (want,)
  else:
    want = data_cfg.tfds_heldout_split
    candidates = (want,) if want else HELDOUT_CANDIDATES
  for c in candidates:
    if c in available:
      return c
  which = 'data.tfds_train_split' if split == 'train' else 'data.tfds_heldout_split'
  raise UserError(f'{key}: TFDS dataset {builder.info.full_name} has no split {want or " / ".join(candidates)!r} '
                  f'for {split} (config key {which}; it has {", ".join(available)})')


def tokenizer_digest(proto: bytes) -> str:
  return hashlib.sha256(proto).hexdigest()[:16]


class TfdsDocuments:
  """One split of an ArrayRecord TFDS dataset. Picklable: each process opens its own reader."""

  def __init__(self, version_dir: str, split: str, text_field: str, label: str, use_ids: bool):
    self._version_dir = version_dir
    self._split = split
    self._field = text_field
    self._label = label
    self.prepared = use_ids  # records carry `ids`: the pipeline reads them instead of tokenizing
    self._source = None
    self._len = len(self._open())

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def _open(self):
    if self._source is None:
      tfds = _tfds()
      builder = tfds.builder_from_directory(self._version_dir)
      try:
        self._source = builder.as_data_source(split=self._split)
      except NotImplementedError:
        raise UserError(f'{self._label} is stored as {builder.info.file_format.value}, which has no random '
                        'access: prepare it with file_format=array_record, or install llm-jax[tf] to stream '
                        'it with tfds.load') from None
    return self._source

  def __len__(self) -> int:
    return self._len

  def name(self, i: int) -> str:
    return f'{self._label}[{self._split}][{i}]'

  def _record(self, i: int):
    try:
      return self._open()[i]
    except Exception as e:  # a truncated or corrupt shard: skip the record, say which
      return Skipped(self.name(i), 'unreadable', f'cannot read record: {type(e).__name__}: {e}')

  def __getitem__(self, i: int):
    if not self.prepared:
      return self.text(i)
    record = self._record(i)
    if isinstance(record, Skipped):
      return record
    ids = np.asarray(record['ids'], np.int32)
    return ids if len(ids) else Skipped(self.name(i), 'empty', 'empty document')

  def text(self, i: int):
    record = self._record(i)
    if isinstance(record, Skipped):
      return record
    if self._field not in record:
      return Skipped(self.name(i), 'missing_field', f'record has no field {self._field!r} (data.text_field)')
    raw = record[self._field]
    if isinstance(raw, np.ndarray):
      raw = raw.item()
    if isinstance(raw, bytes):
      try:
        raw = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        return Skipped(self.name(i), 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason})')
    if not isinstance(raw, str):
      return Skipped(self.name(i), 'missing_field', f'field {self._field!r} is not text')
    if not raw.strip():
      return Skipped(self.name(i), 'empty', 'empty document')
    return raw


def open_tfds(name_or_dir: str, data_cfg, split: str, key: str):
  builder = builder_for(name_or_dir, data_cfg, key)
  tfds_split = split_name(builder, data_cfg, split, key)
  version_dir = str(builder.data_dir)
  label = f'tfds:{name_or_dir}'
  features = builder.info.features
  if features is not None and data_cfg.text_field not in features and 'ids' not in features:
    raise UserError(f'{key}: {label} has no feature {data_cfg.text_field!r} (config key data.text_field; '
                    f'it has {", ".join(features.keys())})')
  use_ids = features is not None and 'ids' in features and os.path.isfile(
      os.path.join(version_dir, TOKENIZER_FILE))
  if builder.info.file_format is not None and builder.info.file_format.value != 'array_record':
    from llm_jax.data import streaming
    return streaming.open_streaming(builder, tfds_split, data_cfg.text_field, label)
  docs = TfdsDocuments(version_dir, tfds_split, data_cfg.text_field, label, use_ids)
  if use_ids:
    with open(os.path.join(version_dir, TOKENIZER_FILE), 'rb') as f:
      docs.tokenizer_proto = f.read()
  if not len(docs):
    raise UserError(f'{key}: {label} split {tfds_split!r} is empty')
  return docs
