"""The tokenizer registry and the sentencepiece backend: trained on the training split when a workdir has
none, or loaded from a file. The other backend, Hugging Face `tokenizers` (tokenizer.json), is in
hf_tokenizer.py; `load` picks one by the files present (BACKENDS), and `from_bytes` by the serialized bytes
(how process 0 hands the tokenizer to other hosts and prepared datasets store it). Every backend has the
interface of `Tokenizer` below: vocab_size, the special ids (-1 where none), encode / encode_array /
encode_batch, decode, is_special, piece_bytes, id_to_piece, files, serialized, chat_template, and pickles as
its bytes.

Trained for text that is mostly code: BPE with byte fallback (any byte sequence encodes, decoding gives the
text back exactly), no normalisation, whitespace kept as is, and '\\n' a piece of its own so line structure
survives. Ids of the ones trained here: 0 pad, 1 bos, 2 eos, 3 unk. A model imported with a checkpoint
(LLaMA's, T5's) keeps its own special ids, so the wrapper reads them from the model.
"""

from __future__ import annotations

import errno
import io
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from llm_jax import atomic, storage
from llm_jax.data import hf_tokenizer
from llm_jax.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_NUMPY_OUT = tuple(int(x) for x in spm.__version__.split('.')[:3] if x.isdigit()) >= (0, 2, 1)
# Lines longer than this are dropped from tokenizer *training* only (sentencepiece's own limit).
_MAX_TRAIN_LINE = 1 << 14


class Tokenizer:
  """A thin, picklable wrapper: grain worker processes receive the serialized model, not a file path."""

  kind = 'sentencepiece'
  mask_id = -1  # masked LM reserves its mask id after the pieces
  chat_template = None  # sentencepiece files carry no chat template

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    sp = self._sp
    # -1 where the model has no such piece (T5's has no BOS, LLaMA's no pad).
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
    self._special = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))

  def __getstate__(self):
    return {'proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['proto'])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids. sentencepiece >= 0.2.1 writes them straight into an array with the GIL released, which
    is ~1.5x faster than building a list and lets prefetch threads tokenize in parallel."""
    if _NUMPY_OUT:
      return self._sp.encode(text, out_type='numpy').astype(np.int32, copy=False)
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and the (start, end) character span of `text` each covers (the Hugging Face backend's call of
    the same name): retrieval cuts passages at token boundaries and keeps where they came from. A character
    split into byte pieces is covered by its last piece."""
    proto = self._sp.encode(text, return_type='proto')
    char_at = np.zeros(len(text.encode('utf-8')) + 1, np.int64)  # byte offset -> character offset
    at = 0
    for i, ch in enumerate(text):
      n = len(ch.encode('utf-8'))
      char_at[at:at + n] = i
      at += n
    char_at[at] = len(text)
    return ([p.id for p in proto.pieces],
            [(int(char_at[p.begin]), int(char_at[p.end]) if p.end > p.begin else int(char_at[p.begin]))
             for p in proto.pieces])

  def is_special(self, i: int) -> bool:
    """Control pieces (pad, bos, eos), the unknown piece, and ids past the vocabulary (a model's table may
    be larger than its tokenizer): what `decode` leaves out."""
    return i in self._special or not 0 <= i < self.vocab_size

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if not self.is_special(int(i))])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_bytes(self, i: int) -> bytes:
    """The bytes id `i` adds to decoded text: '▁' is a space, '<0xNN>' one raw byte, specials nothing."""
    if self.is_special(i):
      return b''
    piece = self._sp.id_to_piece(int(i))
    m = _BYTE_PIECE.match(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace('\u2581', ' ').encode('utf-8')

  def serialized(self) -> bytes:
    return self._proto

  def files(self) -> dict[str, bytes]:
    return {SENTENCEPIECE_FILE: self._proto}


_BYTE_PIECE = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')
SENTENCEPIECE_FILE = 'tokenizer.model'
# Looked for in this order in a directory (a work directory or a Hugging Face checkpoint): a checkpoint that
# ships both (Llama 2) keeps its sentencepiece model, which T5's numbering of sentinels after the pieces
# needs; tokenizer.json is the rest (GPT-2, BERT, Llama 3, Qwen...).
BACKENDS = (('tokenizer.model', 'sentencepiece'), ('spiece.model', 'sentencepiece'),
            (hf_tokenizer.TOKENIZER_JSON, 'hf'))


def find(directory: str) -> str | None:
  """The tokenizer file of a directory (BACKENDS' order), or None."""
  for name, _ in BACKENDS:
    path = storage.join(directory, name)
    if storage.isfile(path):
      return path
  return None


def from_bytes(data: bytes):
  """The tokenizer `serialized()` gave these bytes, whichever backend."""
  if data.startswith(hf_tokenizer.MAGIC):
    return hf_tokenizer.HFTokenizer.from_serialized(data)
  return Tokenizer(data)


def load(path: str):
  """A tokenizer from a sentencepiece .model, a tokenizer.json (its tokenizer_config.json and
  special_tokens_map.json beside it are read too), or a directory holding either."""
  if storage.isdir(path):
    found = find(path)
    if found is None:
      raise UserError(f'{path} holds no tokenizer ({", ".join(n for n, _ in BACKENDS)})')
    path = found
  if path.endswith('.json'):
    if not storage.isfile(path):
      raise UserError(f'cannot read tokenizer {path}: {os.strerror(errno.ENOENT)}')
    if storage.basename(path) != hf_tokenizer.TOKENIZER_JSON:
      raise UserError(f'{path}: a Hugging Face tokenizer is read from a file named '
                      f'{hf_tokenizer.TOKENIZER_JSON} (its tokenizer_config.json beside it)')
    return hf_tokenizer.load_dir(storage.dirname(path) or '.')
  return load_sentencepiece(path)


def write_files(tok, directory: str) -> None:
  """The tokenizer's files into `directory` (atomically each; unchanged files are not rewritten)."""
  for name, data in tok.files().items():
    path = storage.join(directory, name)
    if storage.isfile(path) and storage.read_bytes(path) == data:
      continue
    atomic.write_bytes(path, data)


def load_sentencepiece(path: str) -> Tokenizer:
  try:
    proto = storage.read_bytes(path)
  except OSError as e:
    raise UserError(f'cannot read tokenizer {path}: {e.strerror or e}') from None
  try:
    tok = Tokenizer(proto)
  except Exception:  # sentencepiece raises RuntimeError/OSError variants on a bad proto
    raise UserError(f'{path} is not a sentencepiece model') from None
  if tok.vocab_size <= len(tok._special):
    raise UserError(f'{path}: a tokenizer of {tok.vocab_size} pieces is too small')
  return tok


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  seen = 0
  for text in texts:
    for line in text.split('\n'):
      if line and len(line) < _MAX_TRAIN_LINE:
        yield line
        seen += len(line) + 1
        if seen >= max_chars:
          return


def train(texts: Iterable[str], vocab_size: int, max_chars: int, num_threads: int | None = None) -> Tokenizer:
  """A BPE sentencepiece model of `vocab_size` pieces from at most `max_chars` of `texts`."""
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, max_chars),
        model_writer=out,
        model_type='bpe',
        vocab_size=vocab_size,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        byte_fallback=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=['\n'],
        max_sentence_length=_MAX_TRAIN_LINE,
        character_coverage=0.9995,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:  # e.g. too little text for the requested vocabulary
    raise UserError(f'tokenizer training failed (vocab_size={vocab_size}): {e}') from None
  return Tokenizer(out.getvalue())


def save(tok: Tokenizer, path: str) -> None:
  atomic.write_bytes(path, tok.serialized())
