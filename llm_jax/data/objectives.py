"""Training objectives as per-document transforms, applied before packing.

An objective maps one document's token ids to its per-token features, or None to skip the document, and
declares the packed layout it needs: one or more *streams*, each a group of aligned features packed into
rows of its own length and given its own `segment_ids` and `positions`. A decoder-only objective has one
stream (`inputs`, `targets`, `loss_mask` -> batch keys `segment_ids`, `positions`); an encoder-decoder
objective declares two of different lengths (say `encoder_` and `decoder_` prefixed keys). The packer
(packing.py) reads nothing else, so new objectives (masked LM, span corruption, SFT) plug in here.

Objectives are plain picklable classes (no closures): grain worker processes receive them.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stream:
  """Features packed together into rows of `length`; `prefix` names its segment_ids / positions keys."""
  features: tuple[str, ...]
  length: int
  prefix: str = ''

  @property
  def segment_key(self) -> str:
    return f'{self.prefix}segment_ids'

  @property
  def position_key(self) -> str:
    return f'{self.prefix}positions'


def batch_keys(streams: tuple[Stream, ...]) -> tuple[str, ...]:
  keys = []
  for s in streams:
    keys.extend(s.features)
    keys.extend((s.segment_key, s.position_key))
  return tuple(keys)


class CausalLM:
  """Next-token prediction: the input at t is token t, the target token t + 1."""

  def __init__(self, bos_id: int, eos_id: int, add_bos: bool, add_eos: bool):
    self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos

  def streams(self, seq_len: int) -> tuple[Stream, ...]:
    return (Stream(('inputs', 'targets', 'loss_mask'), seq_len),)

  def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray] | None:
    n = len(ids) + self.add_bos + self.add_eos
    if n < 2:
      return None
    tokens = np.empty(n, np.int32)
    tokens[self.add_bos:self.add_bos + len(ids)] = ids
    if self.add_bos:
      tokens[0] = self.bos_id
    if self.add_eos:
      tokens[-1] = self.eos_id
    return {'inputs': tokens[:-1], 'targets': tokens[1:], 'loss_mask': np.ones(n - 1, np.int32)}


def for_config(data_cfg, tokenizer) -> CausalLM:
  return CausalLM(tokenizer.bos_id, tokenizer.eos_id, data_cfg.add_bos, data_cfg.add_eos)
