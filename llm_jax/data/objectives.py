"""Training objectives as per-document transforms, applied before packing.

An objective maps one document's token ids to its per-token features, or None to skip the document, and
declares the packed layout it needs: one or more *streams*, each a group of aligned features packed into
rows of its own length and given its own `segment_ids` and `positions`. A decoder-only objective has one
stream (`inputs`, `targets`, `loss_mask` -> batch keys `segment_ids`, `positions`); an encoder-decoder
objective declares two of different lengths (say `encoder_` and `decoder_` prefixed keys). The packer
(packing.py) reads nothing else, so new objectives (masked LM, span corruption, SFT) plug in here.

An objective may return several examples for one document (a list of feature dicts): span corruption cuts a
long document into pieces that each fit an encoder row and a decoder row. Random objectives (masking,
span corruption) draw from the generator they are handed, which the pipeline seeds from the run's seed and
the document's place in the stream, so a resumed run masks exactly as the uninterrupted one.

Objectives are plain picklable classes (no closures): grain worker processes receive them.

Ids past the tokenizer's pieces are reserved by the objective (config.reserved_ids): masked LM's mask
token is the first, span corruption's sentinels the last `num_sentinels`, numbered downwards as T5 numbers
its `<extra_id_N>` (sentinel 0 is the highest), so a T5 checkpoint's sentinels are the same ids here.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np


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


def _text_streams(seq_len: int) -> tuple[Stream, ...]:
  return (Stream(('inputs', 'targets', 'loss_mask'), seq_len),)


def _span_streams(seq_len: int, target_len: int) -> tuple[Stream, ...]:
  return (Stream(('inputs',), seq_len, split=False),
          Stream(('decoder_inputs', 'targets', 'loss_mask'), target_len, 'decoder_', split=False))


def streams(data_cfg) -> tuple[Stream, ...]:
  """The packed layout `data.objective` makes, from the config alone (no tokenizer needed)."""
  if data_cfg.objective == 'span':
    return _span_streams(data_cfg.seq_len, data_cfg.target_len)
  if data_cfg.objective in ('sft', 'dpo'):
    from llm_jax.data import chat
    return chat.dpo_streams(data_cfg.seq_len) if data_cfg.objective == 'dpo' else chat.sft_streams(data_cfg.seq_len)
  return _text_streams(data_cfg.seq_len)


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
    return _text_streams(seq_len)

  random = False

  def __call__(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | None:
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


def _with_ends(ids: np.ndarray, bos_id: int, eos_id: int, add_bos: bool, add_eos: bool) -> np.ndarray:
  tokens = np.empty(len(ids) + add_bos + add_eos, np.int32)
  tokens[add_bos:add_bos + len(ids)] = ids
  if add_bos:
    tokens[0] = bos_id
  if add_eos:
    tokens[-1] = eos_id
  return tokens


class MaskedLM:
  """BERT's masked LM (Devlin et al. 2019): `rate` of a document's tokens are chosen; of those, `random_rate`
  become a random token, `keep_rate` stay as they are and the rest become the mask token; the model
  predicts the original token at the chosen places only (inputs and targets are aligned, not shifted).

  The count is round(rate * tokens), at least one, as BERT's data generator does. With `word_table`
  (whole_word_table) a word's pieces are chosen together, words in random order until the count is
  reached without passing it (a first word longer than the count is taken whole).
  """

  random = True

  def __init__(self, bos_id: int, eos_id: int, add_bos: bool, add_eos: bool, mask_id: int,
               random_ids: np.ndarray, rate: float, random_rate: float, keep_rate: float,
               word_table: tuple[np.ndarray, np.ndarray] | None = None):
    self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
    self.mask_id, self.random_ids = mask_id, np.asarray(random_ids, np.int32)
    self.rate, self.random_rate, self.keep_rate = rate, random_rate, keep_rate
    self.word_table = word_table

  def streams(self, seq_len: int) -> tuple[Stream, ...]:
    return _text_streams(seq_len)

  def _words(self, ids: np.ndarray) -> list[np.ndarray]:
    starts_word, ends_word = self.word_table
    # A piece continues the word before it if it has no leading space and both sides are word characters.
    continues = np.zeros(len(ids), bool)
    continues[1:] = ~starts_word[ids[1:]] & ends_word[ids[:-1]]
    return np.split(np.arange(len(ids)), np.flatnonzero(~continues)[1:])

  def choose(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices into `ids` of the tokens to predict, sorted."""
    n = len(ids)
    count = min(n, max(1, int(round(self.rate * n))))
    if self.word_table is None:
      return np.sort(rng.choice(n, count, replace=False))
    chosen, total = [], 0
    words = self._words(ids)
    for w in rng.permutation(len(words)):
      size = len(words[w])
      if total + size > count and total > 0:
        continue
      chosen.append(words[w])
      total += size
      if total >= count:
        break
    return np.sort(np.concatenate(chosen))

  def __call__(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | None:
    if len(ids) == 0:
      return None
    ids = np.asarray(ids, np.int32)
    chosen = self.choose(ids, rng)
    masked = ids.copy()
    draw = rng.random(len(chosen))
    randomised = draw < self.random_rate
    kept = (draw >= self.random_rate) & (draw < self.random_rate + self.keep_rate)
    masked[chosen[~randomised & ~kept]] = self.mask_id
    masked[chosen[randomised]] = rng.choice(self.random_ids, int(randomised.sum()))
    predict = np.zeros(len(ids), np.int32)
    predict[chosen] = 1
    ends = (self.bos_id, self.eos_id, self.add_bos, self.add_eos)
    return {'inputs': _with_ends(masked, *ends), 'targets': _with_ends(ids, *ends),
            'loss_mask': _with_ends(predict, 0, 0, self.add_bos, self.add_eos)}


_WORD_CHAR = re.compile(r'\w')


@functools.lru_cache(maxsize=8)
def _word_table_of(pieces: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  starts = np.array([not (p[:1] and _WORD_CHAR.match(p[0])) for p in pieces], bool)
  ends = np.array([bool(p[-1:]) and bool(_WORD_CHAR.match(p[-1])) for p in pieces], bool)
  return starts, ends


def whole_word_table(tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts_word[V], ends_in_word_char[V]): a piece starts a new word unless it begins with a word
  character (sentencepiece marks a leading space with '\u2581', which is not one); special and byte
  pieces are words of their own."""
  pieces = []
  for i in range(vocab_size):
    if i >= tokenizer.vocab_size or tokenizer.is_special(i) or _BYTE_PIECE.match(tokenizer.id_to_piece(i)):
      pieces.append('')
    else:
      pieces.append(tokenizer.id_to_piece(i))
  return _word_table_of(tuple(pieces))


_BYTE_PIECE = re.compile(r'^<0x[0-9A-Fa-f]{2}>$')


# ---------------------------------------------------------------------------------------------------------
# Span corruption (T5, Raffel et al. 2020)


def span_counts(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a piece of n tokens, as T5 computes them (at least one of each, and at
  least one token left uncorrupted)."""
  noise = min(max(int(round(n * noise_density)), 1), n - 1)
  spans = max(int(round(noise / mean_span_length)), 1)
  return noise, min(spans, noise, n - noise)


def span_lengths(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(encoder length, decoder length) of a corrupted piece of n tokens: the kept tokens plus one sentinel
  per span, and one sentinel per span plus the corrupted tokens; each plus EOS."""
  noise, spans = span_counts(n, noise_density, mean_span_length)
  return n - noise + spans + 1, noise + spans + 1


@functools.lru_cache(maxsize=64)
def span_chunk_length(seq_len: int, target_len: int, noise_density: float, mean_span_length: float) -> int:
  """The longest piece whose corrupted input fits `seq_len` and targets `target_len` (both lengths grow with
  the piece, so every shorter piece fits too); 0 if not even two tokens fit."""
  best = 0
  for n in range(2, 4 * (seq_len + target_len)):
    enc, dec = span_lengths(n, noise_density, mean_span_length)
    if enc > seq_len or dec > target_len:
      break
    best = n
  return best


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` items in `parts` non-empty runs, uniformly over the ways to cut them."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
  return np.diff(np.concatenate([[0], cuts, [total]]))


class SpanCorruption:
  """T5's span corruption: in each piece of a document, `noise_density` of the tokens, in spans of mean
  length `mean_span_length`, are replaced in the encoder input by one sentinel per span; the decoder
  predicts each sentinel followed by the tokens it replaced. Spans alternate with kept runs, starting with
  a kept run. Documents are cut into pieces of at most `chunk` tokens (span_chunk_length), so every
  example fits its two rows and none is split between rows.

  Features: `inputs` (the encoder stream, keys segment_ids / positions) and `decoder_inputs`, `targets`,
  `loss_mask` (the decoder stream, keys decoder_segment_ids / decoder_positions); `decoder_inputs` are the
  targets shifted right behind the decoder start id. EOS ends both (data.add_bos / add_eos are for the
  other objectives: T5 has no BOS).
  """

  random = True

  def __init__(self, eos_id: int, first_sentinel: int, num_sentinels: int, noise_density: float,
               mean_span_length: float, seq_len: int, target_len: int, decoder_start_id: int):
    self.eos_id, self.first_sentinel, self.num_sentinels = eos_id, first_sentinel, num_sentinels
    self.noise_density, self.mean_span_length = noise_density, mean_span_length
    self.decoder_start_id, self.target_len = decoder_start_id, target_len
    self.chunk = span_chunk_length(seq_len, target_len, noise_density, mean_span_length)

  def streams(self, seq_len: int) -> tuple[Stream, ...]:
    return _span_streams(seq_len, self.target_len)

  def sentinel(self, i: int) -> int:
    return self.first_sentinel - i

  def corrupt(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(ids)
    noise, spans = span_counts(n, self.noise_density, self.mean_span_length)
    spans = min(spans, self.num_sentinels)
    noise_len = _partition(noise, spans, rng)
    keep_len = _partition(n - noise, spans, rng)
    inputs, targets, at = [], [], 0
    for i in range(spans):
      inputs.append(ids[at:at + keep_len[i]])
      at += keep_len[i]
      inputs.append([self.sentinel(i)])
      targets.append([self.sentinel(i)])
      targets.append(ids[at:at + noise_len[i]])
      at += noise_len[i]
    inputs.append([self.eos_id])
    targets.append([self.eos_id])
    targets = np.concatenate(targets).astype(np.int32)
    return {'inputs': np.concatenate(inputs).astype(np.int32), 'targets': targets,
            'decoder_inputs': np.concatenate([[self.decoder_start_id], targets[:-1]]).astype(np.int32),
            'loss_mask': np.ones(len(targets), np.int32)}

  def __call__(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> list[dict[str, np.ndarray]]:
    ids = np.asarray(ids, np.int32)
    if len(ids) < 2:
      return []
    # Pieces of equal length (within one) rather than full pieces and a remainder: no 1-token tail to drop.
    count = -(-len(ids) // self.chunk)
    bounds = np.linspace(0, len(ids), count + 1).astype(int)
    return [self.corrupt(ids[a:b], rng) for a, b in zip(bounds[:-1], bounds[1:])]


def for_config(data_cfg, tokenizer, model_cfg=None):
  """The objective `data.objective` names. Masked LM and span corruption need `model_cfg` (the vocabulary
  their random tokens come from; the decoder's start id)."""
  d = data_cfg
  if d.objective in ('sft', 'dpo'):
    from llm_jax.data import chat  # chat.py imports Stream from here
    return chat.for_config(d, tokenizer)
  if d.objective == 'mlm':
    pieces = tokenizer.vocab_size
    random_ids = np.array([i for i in range(pieces) if not tokenizer.is_special(i)], np.int32)
    table = whole_word_table(tokenizer, model_cfg.vocab_size) if d.whole_word_masking else None
    mask_id = tokenizer.mask_id if tokenizer.mask_id >= 0 else pieces  # BERT's [MASK], or reserved
    return MaskedLM(tokenizer.bos_id, tokenizer.eos_id, d.add_bos, d.add_eos, mask_id=mask_id,
                    random_ids=random_ids, rate=d.mask_rate, random_rate=d.mask_random_rate,
                    keep_rate=d.mask_keep_rate, word_table=table)
  if d.objective == 'span':
    return SpanCorruption(tokenizer.eos_id, tokenizer.vocab_size + d.num_sentinels - 1, d.num_sentinels,
                          d.noise_density, d.mean_span_length, d.seq_len, d.target_len,
                          model_cfg.decoder_start_id)
  return CausalLM(tokenizer.bos_id, tokenizer.eos_id, d.add_bos, d.add_eos)
