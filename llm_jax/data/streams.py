"""The packed layout an objective declares: streams of aligned features, each packed into rows of its own
length with its own segment ids and positions (packing.py reads nothing else)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stream:
  """Features packed together into rows of `length`; `prefix` names its segment_ids / positions keys.

  `split=False`: an example that does not fit in what is left of a row starts the next row instead of being
  cut in two (an encoder input must stay in the row of its targets); one longer than a row is still cut.
  """
  features: tuple[str, ...]
  length: int
  prefix: str = ''
  split: bool = True

  @property
  def segment_key(self) -> str:
    return f'{self.prefix}segment_ids'

  @property
  def position_key(self) -> str:
    return f'{self.prefix}positions'


def text_streams(seq_len: int, split: bool = True) -> tuple[Stream, ...]:
  """One stream of next-token features: causal LM, masked LM and (uncut, split=False) chat fine-tuning."""
  return (Stream(('inputs', 'targets', 'loss_mask'), seq_len, split=split),)


def batch_keys(streams: tuple[Stream, ...]) -> tuple[str, ...]:
  keys = []
  for s in streams:
    keys.extend(s.features)
    keys.extend((s.segment_key, s.position_key))
  return tuple(keys)
