"""The input pipeline: documents -> tokens -> objective -> packed rows -> per-process batches -> global arrays.

The data is cut into `data.shards` logical shards, fixed for the life of a run. Shard s reads documents
i with i % shards == s of every source, shuffled afresh each epoch and mixed by weight (mixture.py), and
packs them into rows (packing.py). A global batch is `batch_size / shards` rows from each shard, shard 0
first. Process p of P reads and packs shards [p S/P, (p+1) S/P) only, which are exactly its rows of the
global batch, so the batches, and the state that says where every shard is, do not depend on the number
of processes: a run saved by 2 processes resumes exactly on 1 or 4.

The state is a small JSON object (per shard: next document index and offsets into it) saved in every
checkpoint; `get_state` gathers all processes' shards so that process 0's copy is the whole truth.
"""

from __future__ import annotations

import collections
import sys
from typing import Iterator, Sequence

import jax
import numpy as np

from llm_jax.data import objectives, sources, streams
from llm_jax.data.files import Skipped
from llm_jax.data.mixture import Featurize, fallback_dataset, shard_dataset
from llm_jax.data.packing import Packer, empty_batch
from llm_jax.data.workers import Feeds
from llm_jax.errors import UserError

STATE_FORMAT = 'llm-jax-data/1'
BATCH_KEYS = streams.batch_keys(streams.text_streams(2))
_MESSAGES_PER_KIND = 3


def local_batch_size(data_cfg, process_count: int | None = None) -> int:
  count = jax.process_count() if process_count is None else process_count
  if data_cfg.batch_size % count:
    raise UserError(f'config key data.batch_size={data_cfg.batch_size} is not divisible by the '
                    f'{count} processes')
  return data_cfg.batch_size // count


def shards_of(process_index: int, process_count: int, num_shards: int) -> range:
  if num_shards % process_count:
    raise UserError(f'config key data.shards={num_shards} cannot be split evenly over {process_count} '
                    'processes; use a multiple of the process count (it must stay the same for a run)')
  per = num_shards // process_count
  return range(process_index * per, (process_index + 1) * per)


class SkipLog:
  """Counts bad records by kind; says the first few of each kind (file and line) on stderr."""

  def __init__(self, label: str = ''):
    self.counts: collections.Counter = collections.Counter()
    self._label = label

  def __call__(self, item: Skipped) -> None:
    self.counts[item.kind] += 1
    n = self.counts[item.kind]
    if n <= _MESSAGES_PER_KIND:
      more = ' (further ones counted, not shown)' if n == _MESSAGES_PER_KIND else ''
      print(f'llm-jax: warning:{self._label} skipped {item.message()}{more}', file=sys.stderr, flush=True)

  def dry(self, shard: int, last: Skipped | None) -> None:
    why = f' (the last: {last.message()})' if last is not None else ''
    print(f'llm-jax: warning:{self._label} data shard {shard} has no usable documents of its own{why}; it '
          'reads the whole source from now on', file=sys.stderr, flush=True)

  def summary(self) -> str:
    if not self.counts:
      return ''
    parts = ', '.join(f'{n} {kind}' for kind, n in sorted(self.counts.items()))
    return f'skipped {sum(self.counts.values())} bad records ({parts})'


def check_prepared_tokenizers(parts, tokenizer) -> None:
  from llm_jax.data.tfds_source import tokenizer_digest
  for docs, _ in parts:
    proto = getattr(docs, 'tokenizer_proto', None)
    if proto is not None and proto != tokenizer.serialized():
      raise UserError(f'{docs.name(0).split("[")[0]} was tokenized with tokenizer {tokenizer_digest(proto)}, '
                      f'but this run uses {tokenizer_digest(tokenizer.serialized())}; leave data.tokenizer '
                      'empty in a new workdir to use the prepared one')


class TrainStream:
  """Endless, shuffled, packed training batches: this process's rows of each global batch."""

  def __init__(self, data_cfg, tokenizer, seed: int, process_index: int | None = None,
               process_count: int | None = None, model_cfg=None):
    self._gather = process_count is None and jax.process_count() > 1
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    self.num_shards = data_cfg.shards
    self.shards = shards_of(pi, pc, self.num_shards)
    self._rows = data_cfg.batch_size // self.num_shards  # validate() checks the divisibility
    parts = sources.open_sources(data_cfg, 'train')
    sources.require_texts(data_cfg, parts)
    check_prepared_tokenizers(parts, tokenizer)
    if data_cfg.workers and any(getattr(docs, 'sequential', False) for docs, _ in parts):
      raise UserError(f'config key data.workers={data_cfg.workers}: a streamed (tfrecord) TFDS source is read '
                      'in order by the training process; set data.workers=0')
    objective = objectives.for_config(data_cfg, tokenizer, model_cfg)
    self.streams = objective.streams(data_cfg.seq_len)
    featurize = Featurize(tokenizer, objective, data_cfg.max_doc_chars, seed)
    datasets = [shard_dataset(parts, s, self.num_shards, seed, featurize) for s in self.shards]
    fallbacks = [fallback_dataset(parts, s, seed, featurize) for s in self.shards]
    self._feeds = Feeds(datasets, data_cfg.workers, data_cfg.prefetch,
                        fallbacks if all(f is not None for f in fallbacks) else None)
    self.skips = SkipLog(f' process {pi}:' if pc > 1 else '')
    # Every epoch visits each of a shard's documents once, in some order: a run of skips as long as two
    # epochs holds a whole epoch, so then not one document of the shard is usable any more; it then reads
    # the whole source, and when two passes over that find nothing usable, no usable text is left at all.
    total = sum(len(docs) for docs, _ in parts)
    epoch = total // self.num_shards + 1
    has_fallback = self._feeds.has_fallback
    self._packers = [
        Packer(self.streams, (lambda start, p=p: self._feeds.feed(p, start)), self.skips, 2 * epoch,
               fallback=(lambda start, p=p: self._feeds.feed(p, start, fallback=True)) if has_fallback else None,
               fallback_max_skips=2 * (total + 1), on_dry=(lambda last, s=s: self.skips.dry(s, last)))
        for p, s in enumerate(self.shards)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = empty_batch(self.streams, self._rows * len(self._packers))
    for p, packer in enumerate(self._packers):
      for r in range(p * self._rows, (p + 1) * self._rows):
        packer.fill(out, r)
    return out

  def local_state(self) -> dict:
    """This process's shards only (what a process can say without talking to the others)."""
    return {'format': STATE_FORMAT, 'shards': self.num_shards,
            'positions': {str(s): p.state() for s, p in zip(self.shards, self._packers)}}

  def get_state(self) -> dict:
    """The state of every shard. With several JAX processes, a collective: all must call it together."""
    local = self.local_state()
    return gather_states(local) if self._gather else local

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
      raise UserError('the checkpoint holds a data-iterator state of an older llm-jax; it cannot be resumed '
                      'exactly (start a new workdir)')
    if state['shards'] != self.num_shards:
      raise UserError(f'the checkpoint was written with data.shards={state["shards"]}, this run has '
                      f'data.shards={self.num_shards}; the shard count cannot change during a run')
    for s, packer in zip(self.shards, self._packers):
      if str(s) not in state['positions']:
        raise UserError(f'the checkpoint\'s data state has no position for shard {s} (saved by a run whose '
                        'processes did not all contribute their state)')
      packer.restore(state['positions'][str(s)])

  def close(self) -> None:
    self._feeds.close()


def merge_states(states: Sequence[dict]) -> dict:
  """One state from the local states of all processes (each holds its own shards)."""
  merged = dict(states[0])
  merged['positions'] = {}
  for st in states:
    merged['positions'].update(st['positions'])
  return merged


def gather_states(local: dict) -> dict:
  """Every process's shard positions, on every process (they are small integers: gathered as an array)."""
  from jax.experimental import multihost_utils
  keys = sorted(local['positions'], key=int)
  rows = [[int(k), local['positions'][k]['index'], local['positions'][k].get('part', 0),
           local['positions'][k].get('dry', 0), *local['positions'][k]['offsets']] for k in keys]
  everything = np.asarray(multihost_utils.process_allgather(np.asarray(rows, np.int64)))
  everything = everything.reshape(-1, everything.shape[-1])
  positions = {str(int(r[0])): {'index': int(r[1]), 'part': int(r[2]), 'offsets': [int(x) for x in r[4:]],
                                'dry': int(r[3])} for r in everything}
  return {**local, 'positions': positions}


def eval_batches(docs: Sequence, tokenizer, data_cfg, batch_size: int, num_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1, model_cfg=None,
                 seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Packed batches of the documents in order (this process's share), the last padded to `batch_size`
  rows of segment 0. `docs` is a list of texts or a source's documents; bad records are left out. A random
  objective draws document i's masks from (`seed`, i): every evaluation masks the same tokens.

  With `num_batches`, exactly that many are yielded (all-padding batches once the documents run out), so
  every process of a multi-host run steps the same number of times.
  """
  objective = objectives.for_config(data_cfg, tokenizer, model_cfg)
  streams = objective.streams(data_cfg.seq_len)
  featurize = Featurize(tokenizer, objective, data_cfg.max_doc_chars, seed)
  mine = range(process_index, len(docs), process_count)
  packer = Packer(streams, lambda start: (featurize(docs[i], (i,)) for i in mine[start:]))
  yielded = 0
  while num_batches is None or yielded < num_batches:
    out = empty_batch(streams, batch_size)
    rows = 0
    while rows < batch_size and not packer.exhausted and packer.fill(out, rows):
      rows += 1
    if rows == 0 and num_batches is None:
      return
    yield out
    yielded += 1


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows -> one global jax.Array per key, laid out over the mesh by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
