"""The document stream of one logical data shard: each source's share of the shard, shuffled afresh every
epoch and repeated (grain), then mixed by weight, then read, tokenized and transformed by the objective.

The result is a random-access grain MapDataset: element k of shard s depends only on (config, seed, s, k),
never on how many processes or workers read it, which is what makes resume exact and process-count
independent.

Mixing is stratified: every block of BLOCK documents holds each source's exact share (largest remainder),
in an order drawn from the seed, so the realised mixture is within 1/BLOCK of the weights at any length.
"""

from __future__ import annotations

import sys

import grain
from grain import experimental as grain_exp
import numpy as np

from llm_jax.data.files import Record, Skipped, nothing
from llm_jax.errors import UserError

BLOCK = 1000


def block_counts(weights, block: int = BLOCK) -> np.ndarray:
  w = np.asarray(weights, np.float64) / np.sum(weights)
  exact = w * block
  counts = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - counts), kind='stable')[:block - counts.sum()]:
    counts[i] += 1
  return counts


def check_weights(weights, key: str = 'data.mixture') -> None:
  if any(not w > 0 for w in weights):
    raise UserError(f'config key {key}: every weight must be positive, got {list(weights)}')
  if np.any(block_counts(weights) == 0):
    raise UserError(f'config key {key}: a weight below 1/{BLOCK} of the total cannot be mixed '
                    f'(weights {list(weights)})')


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class EpochShuffle(grain.MapDataset):
  """Documents shard, shard + num_shards, ... of `docs`, repeated forever, each epoch in its own seeded
  order. Like grain's source()[shard::n].shuffle().repeat(), without two of its costs measured here (grain
  0.2.18): its O(1)-memory index shuffle takes milliseconds per element on small ranges (3.5 ms at 10
  elements, 0.5 ms at 82, 2.5 us at a million), so up to SMALL elements the permutation is drawn once per
  epoch and kept; and its source wrapper adds ~40 us of bookkeeping per read."""

  SMALL = 1 << 20

  def __init__(self, docs, shard: int, num_shards: int, seed: int):
    super().__init__([])
    self._docs, self._shard, self._stride = docs, shard, num_shards
    self._n = len(range(shard, len(docs), num_shards))
    self._shuffle_seed = seed
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'EpochShuffle(n={self._n})'

  def _position(self, epoch: int, i: int) -> int:
    if self._n > self.SMALL:
      return int(grain_exp.index_shuffle(i, max_index=self._n - 1, seed=_seed(self._shuffle_seed, epoch),
                                         rounds=4))
    perms = self._perms
    perm = perms.get(epoch)
    if perm is None:
      rng = np.random.default_rng(_seed(self._shuffle_seed, epoch))
      perm = rng.permutation(self._n)
      groups = getattr(self._docs, 'groups', None)
      if groups is not None:  # row groups in a random order, each one's documents together (tables.py)
        mine = np.asarray(groups[self._shard::self._stride])
        rank = rng.permutation(int(mine.max()) + 1)
        perm = perm[np.argsort(rank[mine[perm]], kind='stable')]
      # Reading ahead can straddle two epochs; older ones are done. The dict is replaced, not changed in
      # place, because a prefetch thread of a feed being replaced (resume) may still be reading it.
      self._perms = {**{e: p for e, p in perms.items() if e >= epoch - 1}, epoch: perm}
    return int(perm[i])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    return self._docs[self._shard + self._stride * self._position(epoch, i)]


class WeightedMix(grain.MapDataset):
  """Infinite parents mixed in blocks: block b holds counts[j] elements of parent j, seeded order."""

  def __init__(self, parents, weights, seed: int):
    super().__init__(list(parents))
    self._counts = block_counts(weights)
    self._mix_seed = seed
    self._labels = np.repeat(np.arange(len(self._counts)), self._counts)
    self._cached = (-1, None, None)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'WeightedMix(counts={self._counts.tolist()})'

  def _block(self, b: int):
    if self._cached[0] != b:
      labels = np.random.default_rng(_seed(self._mix_seed, b)).permutation(self._labels)
      ranks = np.empty(len(labels), np.int64)
      for j in range(len(self._counts)):
        where = np.flatnonzero(labels == j)
        ranks[where] = np.arange(len(where))
      self._cached = (b, labels, ranks)
    return self._cached[1], self._cached[2]

  def source_of(self, index: int) -> int:
    labels, _ = self._block(index // BLOCK)
    return int(labels[index % BLOCK])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, r = divmod(index, BLOCK)
    labels, ranks = self._block(b)
    j = int(labels[r])
    return self._parents[j][b * int(self._counts[j]) + int(ranks[r])]


class Featurize:
  """Document -> the objective's features. Text is tokenized in pieces of at most `max_chars` (a bound on
  one tokenizer call); pre-tokenized ids go straight to the objective. Picklable for worker processes.

  A random objective (masking, span corruption) gets a generator seeded by `seed` and the document's `key`,
  its place in the stream: the same document masks differently each epoch, and the same at a resume."""

  def __init__(self, tokenizer, objective, max_chars: int, seed: int = 0):
    self._tokenizer, self._objective, self._max, self._seed = tokenizer, objective, max_chars, seed

  def __call__(self, item, key: tuple[int, ...] = ()):
    if isinstance(item, Skipped):
      return item
    if isinstance(item, Record):  # chat objectives read whole records; a bad one comes back Skipped
      return self._objective.from_record(item)
    if isinstance(item, str):
      if len(item) <= self._max:
        ids = self._tokenizer.encode_array(item)
      else:
        ids = np.concatenate([self._tokenizer.encode_array(item[i:i + self._max])
                              for i in range(0, len(item), self._max)])
    else:
      ids = item
    rng = np.random.default_rng([self._seed, *key]) if self._objective.random else None
    features = self._objective(ids, rng)
    return nothing() if features is None else features


class _Keyed:
  """map_with_index's (index, item) -> featurize(item, key=(shard, index))."""

  def __init__(self, featurize: Featurize, shard: int):
    self._featurize, self._shard = featurize, shard

  def __call__(self, index: int, item):
    return self._featurize(item, (self._shard, index))


def _whole_source(docs, j: int, shard: int, seed: int, salt: int) -> EpochShuffle:
  """Every document of a source, in an order of the shard's own: what a shard reads that has none of a
  source's documents (fewer documents than shards), or whose own ran dry (`fallback_dataset`)."""
  return EpochShuffle(docs, 0, 1, _seed(seed, j, shard, salt))


def shard_dataset(parts, shard: int, num_shards: int, seed: int, featurize) -> grain.MapDataset:
  """Element k of logical shard `shard`: documents i with i % num_shards == shard of every source."""
  streams = []
  for j, (docs, _) in enumerate(parts):
    if getattr(docs, 'sequential', False):  # a tfrecord stream (streaming.py): its own order, unshuffled
      if len(docs) < num_shards:
        raise UserError(f'a streamed training source has {len(docs)} documents, fewer than the {num_shards} '
                        'data shards (config key data.shards)')
      streams.append(docs.shard(shard, num_shards))
    elif shard >= len(docs):
      streams.append(_whole_source(docs, j, shard, seed, 1))
    else:
      streams.append(EpochShuffle(docs, shard, num_shards, _seed(seed, j, shard)))
  return _mix(streams, parts, shard, seed, -1).map_with_index(_Keyed(featurize, shard))


def fallback_dataset(parts, shard: int, seed: int, featurize) -> grain.MapDataset | None:
  """What shard `shard` reads once none of its own documents is usable any more (they were all bad, or
  deleted during the run): every document of every source, in the shard's own order. None for a streamed
  source, which has no random access."""
  if any(getattr(docs, 'sequential', False) for docs, _ in parts):
    return None
  streams = [_whole_source(docs, j, shard, seed, 2) for j, (docs, _) in enumerate(parts)]
  return _mix(streams, parts, shard, seed, -2).map_with_index(_Keyed(featurize, shard))


def _mix(streams, parts, shard: int, seed: int, salt: int) -> grain.MapDataset:
  return streams[0] if len(streams) == 1 else WeightedMix(streams, [w for _, w in parts], _seed(seed, shard, salt))
