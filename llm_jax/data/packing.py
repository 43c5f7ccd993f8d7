"""Objective-agnostic packing: documents (per-token features, as an objective makes them) -> rows.

Documents are laid end to end in rows of each stream's length (streams.Stream). Each document in a row
gets the next segment id (1, 2, ...; 0 is padding, whose loss_mask is 0) and positions counting from 0; a
document that does not fit in what is left of a row is cut there and continues at the start of the next
row as a new segment (positions restart), so an overlong document is split, never dropped. With several
streams (encoder-decoder), a document's streams share its segment id and the row ends when any stream's
row is full. A stream with `split=False` never cuts an example that fits a row: it starts the next row.

An objective may turn one document into several examples (a list); each is packed like a document of its
own. The packer's state is four numbers and an offset per stream: which document comes next, which of its
examples, how much of that the earlier rows already took, and whether the feed ran dry (Packer). Documents
come from a `feed(start)` that yields the document at index start, start + 1, ...; resuming re-reads at
most the one document that was cut.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from llm_jax.data.files import Skipped
from llm_jax.data.streams import Stream
from llm_jax.errors import UserError

Feed = Callable[[int], Iterator]


class Packer:
  """Fills rows of a batch from one ordered document feed."""

  def __init__(self, streams: tuple[Stream, ...], feed: Feed, on_skip: Callable[[Skipped], None] = None,
               max_skips: int | None = None, fallback: Feed | None = None, fallback_max_skips: int | None = None,
               on_dry: Callable[[Skipped | None], None] = None):
    self._streams = streams
    self._feed = feed
    self._on_skip = on_skip
    # An endless feed whose documents all became unusable (the files deleted mid-run, or records of the wrong
    # kind for the objective: a DPO file given to SFT) would otherwise be skipped through forever: this many
    # skips in a row is an error, or with a `fallback` feed (a data shard whose own documents are all bad
    # reads the whole source), the point where the packer reads the fallback from the same index on; that
    # one's `fallback_max_skips` in a row is then the error. The switch is part of the state: exact resume.
    self._max_skips = max_skips
    self._fallback, self._fallback_max, self._on_dry = fallback, fallback_max_skips, on_dry
    self._dry = False
    self._arange = np.arange(max(s.length for s in streams), dtype=np.int32)
    self._index = 0  # the document at the front: partly taken (part or offsets > 0) or next to read
    self._part = 0  # which of its examples
    self._offsets = [0] * len(streams)
    self._examples = None  # the front document's examples, once read
    self._it = None
    self.exhausted = False  # a finite feed ran out

  def state(self) -> dict:
    return {'index': self._index, 'part': self._part, 'offsets': list(self._offsets), 'dry': int(self._dry)}

  def restore(self, state: dict) -> None:
    self._index = int(state['index'])
    self._part = int(state.get('part', 0))
    self._offsets = [int(o) for o in state['offsets']]
    self._dry = bool(state.get('dry', 0)) and self._fallback is not None
    if len(self._offsets) != len(self._streams):
      raise ValueError(f'packer state has {len(self._offsets)} streams, expected {len(self._streams)}')
    self._examples, self._it, self.exhausted = None, None, False

  def _next_document(self):
    """The examples of the document at self._index, skipping bad ones; None when the feed ends."""
    if self._it is None:
      self._it = iter((self._fallback if self._dry else self._feed)(self._index))
    skipped, last = 0, None
    while True:
      try:
        item = next(self._it)
      except StopIteration:
        self.exhausted = True
        return None
      if isinstance(item, dict):
        return [item]
      if isinstance(item, list):
        return item
      if isinstance(item, Skipped) and not item.silent:
        last = item
        if self._on_skip is not None:
          self._on_skip(item)
      skipped += 1
      limit = self._fallback_max if self._dry else self._max_skips
      if not self._dry and self._fallback is not None and limit is not None and skipped >= limit:
        self._advance()
        self._dry, skipped = True, 0
        self._it = iter(self._fallback(self._index))
        if self._on_dry is not None:
          self._on_dry(last)
        continue
      if limit is not None and skipped >= limit:
        why = f' (the last: {last.message()})' if last is not None else ''
        raise UserError(f'{skipped} documents in a row could not be used{why}: no usable training data is '
                        'left; were the files of data.source moved or deleted during the run, or do its records '
                        'not fit data.objective?')
      self._advance()

  def _advance(self) -> None:
    self._index += 1
    self._part = 0
    self._offsets = [0] * len(self._streams)
    self._examples = None

  def _front(self):
    """The example at the front of the feed, None when the feed ends."""
    while self._examples is None:
      examples = self._next_document()
      if examples is None:
        return None
      if self._part < len(examples):
        self._examples = examples
      else:  # a document the objective made no example of
        self._advance()
    return self._examples[self._part]

  def _fits(self, example, cursors) -> bool:
    for stream, c in zip(self._streams, cursors):
      if not stream.split and c > 0 and len(example[stream.features[0]]) > stream.length - c:
        return False
    return True

  def fill(self, out: dict[str, np.ndarray], row: int) -> bool:
    """Pack one row into out[key][row] (zeroed by the caller); False if the feed ended before any token."""
    streams = self._streams
    cursors = [0] * len(streams)
    segment = 0
    while True:
      doc = self._front()
      if doc is None:
        return segment > 0
      if segment > 0 and not self._fits(doc, cursors):
        return True
      segment += 1
      finished, full = True, False
      for s, stream in enumerate(streams):
        n = len(doc[stream.features[0]])
        o, c = self._offsets[s], cursors[s]
        take = min(n - o, stream.length - c)
        if take > 0:
          for key in stream.features:
            out[key][row, c:c + take] = doc[key][o:o + take]
          out[stream.segment_key][row, c:c + take] = segment
          out[stream.position_key][row, c:c + take] = self._arange[:take]
          cursors[s] = c + take
          self._offsets[s] = o + take
        finished &= self._offsets[s] >= n
        full |= cursors[s] >= stream.length
      if finished:
        self._offsets = [0] * len(streams)
        self._part += 1
        if self._part == len(self._examples):
          self._advance()
      if full or not finished:
        return True


def empty_batch(streams: tuple[Stream, ...], rows: int) -> dict[str, np.ndarray]:
  out = {}
  for s in streams:
    for key in s.features + (s.segment_key, s.position_key):
      out[key] = np.zeros((rows, s.length), np.int32)
  return out
