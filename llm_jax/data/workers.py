"""Reading ahead: the ordered document feeds the packers pull from.

`data.workers = 0`: documents are read, tokenized and transformed in this process, `data.prefetch` of them
ahead per shard, in chunks, by reading threads: as many as there are cores (at most 8), each shard always on
the same one, so a shard's documents are read in order by one thread. They overlap file, TFDS and bucket
reads with packing, and tokenize on every core (sentencepiece releases the GIL while it encodes). A chunk per
hand-over, not a document: grain's per-document prefetch (one thread per shard), which this replaced, cost
prepared data a third of its speed in queueing and thread switches (BENCHMARKS.md, bench_data).
`data.workers = N`: N worker processes (spawned, never forked from a process running JAX) share that work
for all of this process's shards, the same way. Either way element k of a shard is the same: the datasets
are pure functions of the index (mixture.py), so the worker count changes speed, never the batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import pickle

READING_THREADS = max(1, min(8, os.cpu_count() or 1))
_DATASETS = None  # in a worker process: the shard datasets, unpickled once


def _init_worker(payload: bytes) -> None:
  global _DATASETS
  _DATASETS = pickle.loads(payload)


def _read_chunk(shard: int, start: int, count: int, datasets: list | None = None) -> list:
  """Elements [start, start + count) of a shard's dataset: in a worker process its own unpickled copy, in a
  reading thread the training process's (`datasets`)."""
  ds = (_DATASETS if datasets is None else datasets)[shard]
  return [ds[k] for k in range(start, start + count)]


class _PoolFeed:
  """A shard's elements from `start` (up to `limit`), read ahead by an executor in chunks, taken in order."""

  def __init__(self, pool, shard: int, start: int, prefetch: int, limit: int | None, datasets: list | None = None):
    self._pool, self._shard, self._limit, self._datasets = pool, shard, limit, datasets
    self._chunk = max(1, prefetch // 4)
    self._depth = max(1, -(-prefetch // self._chunk))
    self._next = start
    self._pending = collections.deque()
    self._ready = collections.deque()

  def _submit(self) -> None:
    while len(self._pending) < self._depth and (self._limit is None or self._next < self._limit):
      count = self._chunk if self._limit is None else min(self._chunk, self._limit - self._next)
      self._pending.append(self._pool.submit(_read_chunk, self._shard, self._next, count, self._datasets))
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
    self._pool = None  # the worker processes
    self._threads: dict[int, concurrent.futures.ThreadPoolExecutor] = {}  # with no workers: each shard's reader
    self._open: dict[int, _PoolFeed] = {}
    self._workers = workers
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
    if self._workers:
      feed = _PoolFeed(self._pool, which, start, self._prefetch, limit)
    elif self._prefetch <= 0:
      sliced = self._datasets[which][start:limit]
      return (sliced[k] for k in range(len(sliced)))
    else:
      lane = position % READING_THREADS
      thread = self._threads.get(lane)
      if thread is None:
        thread = self._threads[lane] = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f'llm-jax-read-{lane}')
      feed = _PoolFeed(thread, which, start, self._prefetch, limit, self._datasets)
    self._open[position] = feed
    return feed

  def close(self) -> None:
    for feed in self._open.values():
      feed.close()
    self._open.clear()
    for pool in [self._pool, *self._threads.values()]:
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    self._pool, self._threads = None, {}
