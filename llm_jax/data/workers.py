"""Reading ahead: the ordered document feeds the packers pull from.

`data.workers = 0`: documents are read, tokenized and transformed in this process, `data.prefetch` of
them ahead per shard by a grain prefetch thread (which overlaps file and TFDS reads; tokenization holds
the GIL). `data.workers = N`: N worker processes (spawned, never forked from a process running JAX) share
that work for all of this process's shards; each shard keeps `data.prefetch` documents in flight, in
chunks, and takes results back in order. Either way element k of a shard is the same: the datasets are
pure functions of the index (mixture.py), so the worker count changes speed, never the batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import pickle

import grain

_DATASETS = None  # in a worker process: the shard datasets, unpickled once


def _init_worker(payload: bytes) -> None:
  global _DATASETS
  _DATASETS = pickle.loads(payload)


def _read_chunk(shard: int, start: int, count: int) -> list:
  ds = _DATASETS[shard]
  return [ds[k] for k in range(start, start + count)]


class _PoolFeed:

  def __init__(self, pool, shard: int, start: int, prefetch: int, limit: int | None):
    self._pool, self._shard, self._limit = pool, shard, limit
    self._chunk = max(1, prefetch // 4)
    self._depth = max(1, -(-prefetch // self._chunk))
    self._next = start
    self._pending = collections.deque()
    self._ready = collections.deque()

  def _submit(self) -> None:
    while len(self._pending) < self._depth and (self._limit is None or self._next < self._limit):
      count = self._chunk if self._limit is None else min(self._chunk, self._limit - self._next)
      self._pending.append(self._pool.submit(_read_chunk, self._shard, self._next, count))
      self._next += count

  def __iter__(self):
    return self

  def __next__(self):
    if not self._ready:
      self._submit()
      if not self._pending:
        raise StopIteration
      self._ready.extend(self._pending.popleft().result())
      self._submit()
    return self._ready.popleft()

  def close(self) -> None:
    for f in self._pending:
      f.cancel()


class Feeds:
  """feed(shard_position, start) -> iterator over datasets[shard_position][start:], read ahead."""

  def __init__(self, datasets: list, workers: int, prefetch: int, fallbacks: list | None = None):
    # A shard's fallback (mixture.fallback_dataset) is dataset len(datasets) + its position.
    self.has_fallback = fallbacks is not None
    self._count = len(datasets)
    datasets = list(datasets) + list(fallbacks or [])
    self._datasets = datasets
    self._prefetch = prefetch
    self._pool = None
    self._open: dict[int, _PoolFeed] = {}
    if workers > 0:
      ctx = multiprocessing.get_context('spawn')
      self._pool = concurrent.futures.ProcessPoolExecutor(
          max_workers=workers, mp_context=ctx, initializer=_init_worker,
          initargs=(pickle.dumps(datasets),))

  def feed(self, position: int, start: int, limit: int | None = None, fallback: bool = False):
    """A new feed for `position` replaces (and stops) the one before it: a resume re-positions a shard, a
    shard that ran dry reads its fallback."""
    if position in self._open:
      self._open.pop(position).close()
    which = position + (self._count if fallback else 0)
    if self._pool is not None:
      feed = _PoolFeed(self._pool, which, start, self._prefetch, limit)
    else:
      sliced = self._datasets[which][start:limit]
      if self._prefetch <= 0:
        return (sliced[k] for k in range(len(sliced)))
      options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)
      feed = iter(sliced.to_iter_dataset(options))
    self._open[position] = feed
    return feed

  def close(self) -> None:
    for feed in self._open.values():
      feed.close()
    self._open.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
