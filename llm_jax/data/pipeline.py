"""The input pipeline: documents -> tokens -> objective -> packed rows -> per-host batches -> global arrays.

Built on grain: a random-access `MapDataset` of documents (sliced per JAX process, shuffled afresh each
epoch, repeated), tokenized and transformed in prefetch threads, then packed into rows of `seq_len` with
`segment_ids` and `positions` (documents longer than a row are split, never dropped), then batched. The
iterator's state is a small JSON object saved in every checkpoint, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from grain import experimental as grain_exp

from llm_jax.data import objectives
from llm_jax.data.sources import open_source
from llm_jax.errors import UserError

FEATURES = ('inputs', 'targets', 'loss_mask')
BATCH_KEYS = FEATURES + ('segment_ids', 'positions')


def _transform(tokenizer, objective):
  def fn(text: str):
    return objective(np.asarray(tokenizer.encode(text), np.int32))
  return fn


def _packed_row(x: dict) -> dict[str, np.ndarray]:
  row = {k: x[k] for k in FEATURES}
  row['segment_ids'] = x['inputs_segment_ids']
  row['positions'] = x['inputs_positions']
  return row


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concatenate documents and cut rows of `seq_len`; a document cut at a row's end continues in the next
  row as a new segment (positions restart), and the last row of a finite stream is padded (segment 0)."""
  packed = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={k: seq_len for k in FEATURES})
  return packed.map(_packed_row)


def local_batch_size(data_cfg) -> int:
  count = jax.process_count()
  if data_cfg.batch_size % count:
    raise UserError(f'config key data.batch_size={data_cfg.batch_size} is not divisible by the '
                    f'{count} processes')
  return data_cfg.batch_size // count


class TrainStream:
  """Endless, shuffled, packed training batches of this process's slice of the documents."""

  def __init__(self, data_cfg, tokenizer, seed: int, process_index: int | None = None,
               process_count: int | None = None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    docs = open_source(data_cfg, 'train')
    if len(docs) < pc:
      raise UserError(f'data.source has {len(docs)} training documents, fewer than the {pc} processes')
    objective = objectives.for_config(data_cfg, tokenizer)
    ds = grain.MapDataset.source(docs)[pi::pc].shuffle(seed=seed).repeat()
    ds = ds.map(_transform(tokenizer, objective)).filter(lambda x: x is not None)
    it_ds = pack(ds.to_iter_dataset(), data_cfg.seq_len)
    it_ds = it_ds.batch(data_cfg.batch_size // pc, drop_remainder=True)
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return json.loads(json.dumps(self._it.get_state()))

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


def eval_batches(texts: Sequence[str], tokenizer, data_cfg, batch_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Packed batches of the documents in order (this process's share), the last padded to `batch_size`
  rows of segment 0. Documents are read lazily.

  With `num_batches`, exactly that many are yielded (all-padding batches once the documents run out), so
  every process of a multi-host run steps the same number of times.
  """
  objective = objectives.for_config(data_cfg, tokenizer)
  ds = grain.MapDataset.source(texts)[process_index::process_count]
  ds = ds.map(_transform(tokenizer, objective))
  ds = ds.filter(lambda x: x is not None)
  rows = iter(pack(ds.to_iter_dataset(), data_cfg.seq_len))
  yielded = 0
  while num_batches is None or yielded < num_batches:
    batch = [row for _, row in zip(range(batch_size), rows)]
    if not batch and num_batches is None:
      return
    while len(batch) < batch_size:
      batch.append(_empty_row(data_cfg.seq_len))
    yield {k: np.stack([r[k] for r in batch]) for k in BATCH_KEYS}
    yielded += 1


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows -> one global jax.Array per key, laid out over the mesh by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
