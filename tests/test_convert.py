"""Hugging Face interop without torch: tokenizers with other special ids, checkpoints read and written as
safetensors, and bad HF directories refused with one line that names the problem."""

import io

import sentencepiece as spm

from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax import stops


def _t5_style_tokenizer() -> tokenizer_lib.Tokenizer:
  """pad 0, eos 1, unk 2 and no BOS, like T5's spiece.model."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['hello world foo bar baz'] * 50 + ['the quick brown fox'] * 50),
      model_writer=out, vocab_size=40, model_type='bpe', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  return tokenizer_lib.Tokenizer(out.getvalue())


def test_special_ids_come_from_the_sentencepiece_model():
  tok = _t5_style_tokenizer()
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, -1)
  ids = tok.encode('hello fox')
  # Specials and ids past the tokenizer (a model's table may be larger) decode to nothing.
  assert tok.decode([1, 0, 2] + ids + [1, 40, 10_000]) == tok.decode(ids) == 'hello fox'
  pieces = stops.token_bytes(tok, 64)
  assert pieces[0] == pieces[1] == pieces[2] == pieces[50] == b''
  assert b''.join(pieces[i] for i in ids) == b' hello fox'  # sentencepiece's dummy prefix space
