"""TFDS datasets stored only as tfrecord (no random access), streamed with `tfds.load` where TensorFlow is
installed (extra [tf]).

A stream cannot be shuffled by index, so each logical shard reads its documents (i % shards == shard) in
the dataset's order, epoch after epoch; element k of a shard is still a pure function of k (the k-th
document of that order), which keeps resume exact: after a restart, the stream is rebuilt and skips to k.
Reading is sequential, so streaming sources are read in the training process (data.workers = 0).
"""

from __future__ import annotations

import sys

import grain

from llm_jax.data.files import Skipped
from llm_jax.errors import UserError


def _tf_tfds():
  try:
    import tensorflow as tf  # noqa: F401
  except ImportError:
    raise UserError('this TFDS dataset is stored as tfrecord, which has no random access: prepare it with '
                    "file_format=array_record, or install llm-jax[tf] to stream it with tfds.load") from None
  import tensorflow_datasets as tfds
  return tf, tfds


def _decode(record, field: str, where: str):
  raw = record.get(field) if isinstance(record, dict) else None
  if raw is None:
    return Skipped(where, 'missing_field', f'record has no field {field!r} (data.text_field)')
  if isinstance(raw, bytes):
    try:
      raw = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      return Skipped(where, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} ({e.reason})')
  if not isinstance(raw, str) or not raw.strip():
    return Skipped(where, 'empty', 'empty document')
  return raw


class _Sequential:
  """An iterator over a tf.data pipeline that is rebuilt (skipping ahead) when asked out of order."""

  def __init__(self, make):
    self._make, self._it, self._next = make, None, 0

  def __getstate__(self):
    return {'_make': self._make, '_it': None, '_next': 0}

  def get(self, k: int):
    if self._it is None or k != self._next:
      self._it = iter(self._make(k))
      self._next = k
    self._next += 1
    return next(self._it)


class StreamingDocuments:
  sequential = True
  prepared = False

  def __init__(self, version_dir: str, split: str, field: str, label: str, length: int):
    self._version_dir, self._split, self._field, self._label = version_dir, split, field, label
    self._len = length
    self._reader = _Sequential(self._stream)

  def _stream(self, start: int, shard: int = 0, num_shards: int = 1, repeat: bool = False):
    tf, tfds = _tf_tfds()
    ds = tfds.builder_from_directory(self._version_dir).as_dataset(split=self._split, shuffle_files=False)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options).shard(num_shards, shard)
    if repeat:
      ds = ds.repeat()
    return tfds.as_numpy(ds.skip(start))

  def __len__(self) -> int:
    return self._len

  def name(self, i: int) -> str:
    return f'{self._label}[{self._split}][{i}]'

  def __getitem__(self, i: int):
    return _decode(self._reader.get(i), self._field, self.name(i))

  def text(self, i: int):
    return self[i]

  def shard(self, shard: int, num_shards: int) -> grain.MapDataset:
    return _ShardStream(self, shard, num_shards)


class _ShardStream(grain.MapDataset):
  """Element k: the k-th document of shard `shard` in stream order, epochs repeating."""

  def __init__(self, docs: StreamingDocuments, shard: int, num_shards: int):
    super().__init__([])
    self._docs, self._shard, self._num_shards = docs, shard, num_shards
    self._reader = _Sequential(lambda k: docs._stream(k, shard, num_shards, repeat=True))

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    per_epoch = len(range(self._shard, len(self._docs), self._num_shards))
    where = self._docs.name(self._shard + self._num_shards * (index % max(per_epoch, 1)))
    return _decode(self._reader.get(index), self._docs._field, where)


def open_streaming(builder, split: str, field: str, label: str) -> StreamingDocuments:
  _tf_tfds()
  length = builder.info.splits[split].num_examples
  return StreamingDocuments(str(builder.data_dir), split, field, label, length)
