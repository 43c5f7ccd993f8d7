"""Stop strings, matched on the device while decoding, exactly, whatever the token boundaries.

A stop string may end in the middle of a token or span several, so comparing token ids cannot find it.
Instead each stop string becomes a Knuth-Morris-Pratt automaton over bytes, and that automaton is lifted to
whole tokens on the host: `table[s, q, v]` is the state string s's automaton reaches from state q after
reading the bytes of token v. The decode loop then advances every row's state with one gather per step and
stops a row when a state reaches the string's length (the state of a full match, made absorbing).

Letters: S stop strings (padded), Q automaton states (max length + 1, padded), V vocab, B rows.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


def token_bytes(tokenizer, vocab_size: int) -> tuple[bytes, ...]:
  """The bytes each id adds to decoded text (each backend knows its pieces' spelling: sentencepiece's '▁'
  and '<0xNN>', byte-level BPE's stand-in characters; special ids add nothing). Ids past the tokenizer's
  vocabulary (model.vocab_size may be larger) add nothing."""
  n = tokenizer.vocab_size
  return tuple(b'' if i >= n or tokenizer.is_special(i) else tokenizer.piece_bytes(i) for i in range(vocab_size))


def _kmp_delta(pattern: bytes) -> np.ndarray:
  """[m + 1, 256] transitions of the byte automaton of `pattern`; state m (matched) is absorbing."""
  m = len(pattern)
  delta = np.zeros((m + 1, 256), np.int32)
  delta[0, pattern[0]] = 1
  fallback = 0  # the state reached by the longest proper border of the prefix read so far
  for q in range(1, m):
    delta[q] = delta[fallback]
    delta[q, pattern[q]] = q + 1
    fallback = delta[fallback, pattern[q]]
  delta[m] = m
  return delta


class TokenBytes:
  """A vocabulary's bytes as a padded [V, W] array (-1 past each token's end), to lift automata with."""

  def __init__(self, pieces: Sequence[bytes]):
    width = max(1, max(len(p) for p in pieces))
    self.array = np.full((len(pieces), width), -1, np.int32)
    for v, p in enumerate(pieces):
      self.array[v, :len(p)] = list(p)

  @functools.lru_cache(maxsize=256)
  def lift(self, pattern: bytes) -> np.ndarray:
    """[m + 1, V]: the state after reading each whole token from each state."""
    delta = _kmp_delta(pattern)
    m = len(pattern)
    V, W = self.array.shape
    out = np.empty((m + 1, V), np.int32)
    for q in range(m + 1):
      state_V = np.full(V, q, np.int32)
      for w in range(W):
        byte_V = self.array[:, w]
        ok = byte_V >= 0
        state_V = np.where(ok, delta[state_V, np.where(ok, byte_V, 0)], state_V)
      out[q] = state_V
    return out


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def build(vocab: TokenBytes, stops_per_row: Sequence[Sequence[str]], rows: int):
  """The batch's tables: (table_SQV, length_S, mask_BS). The union of the rows' stop strings is matched for
  every row and `mask_BS` says which apply to which row. Shapes are rounded up so a few compiled programs
  serve all requests."""
  strings = sorted({s.encode('utf-8') for row in stops_per_row for s in row})
  S = max(1, 1 << (len(strings) - 1).bit_length()) if strings else 1
  Q = _round_up(max((len(s) for s in strings), default=0) + 1, 8)
  V = vocab.array.shape[0]
  table = np.zeros((S, Q, V), np.int32)
  length = np.full(S, Q, np.int32)  # padded slots can never match
  for i, s in enumerate(strings):
    table[i, :len(s) + 1] = vocab.lift(s)
    length[i] = len(s)
  index = {s: i for i, s in enumerate(strings)}
  mask = np.zeros((rows, S), bool)
  for b, row in enumerate(stops_per_row):
    for s in row:
      mask[b, index[s.encode('utf-8')]] = True
  return table, length, mask


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the first stop string (not included), and whether one was found."""
  first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  return (text[:first], True) if first >= 0 else (text, False)
