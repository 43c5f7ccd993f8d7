"""The tokenizer as lm-evaluation-harness's remote tokenizer (and vLLM's API) expose it: GET /tokenizer_info,
POST /tokenize and /detokenize of `llm-jax serve` (server.py routes them here). With these a harness's
`local-completions` model needs no tokenizer of its own: it reads the special tokens and the context length
from /tokenizer_info and counts tokens with /tokenize. A bad body is an ApiError (400) naming the field.
"""

from __future__ import annotations

import re

from llm_jax.infer import inference
from llm_jax.serve.openai_api import ApiError


class TokenizerApi:
  """The three endpoints' answers for one loaded run."""

  def __init__(self, run: inference.Run):
    self.run = run
    tok = run.tokenizer
    self._special_ids = {tok.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id)
                         if 0 <= i < tok.vocab_size}
    self._special_split = re.compile('(' + '|'.join(map(re.escape, self._special_ids)) + ')') \
        if self._special_ids else None

  def tokenizer_info(self) -> dict:
    tok = self.run.tokenizer
    piece = lambda i: tok.id_to_piece(i) if 0 <= i < tok.vocab_size else None  # noqa: E731
    kind = 'huggingface' if getattr(tok, 'chat_template', None) is not None or type(tok).__name__ == 'HFTokenizer' \
        else 'sentencepiece'
    return {'tokenizer_class': kind, 'bos_token': piece(tok.bos_id), 'eos_token': piece(tok.eos_id),
            'pad_token': piece(tok.pad_id), 'unk_token': piece(tok.unk_id), 'add_bos_token': bool(
                self.run.cfg.data.add_bos), 'model_max_length': self.run.context_len,
            'vocab_size': self.run.cfg.model.vocab_size,
            'chat_template': getattr(tok, 'chat_template', None) or None}

  def tokenize(self, body) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get('prompt'), str):
      raise ApiError(400, '"prompt" must be a string')
    special = body.get('add_special_tokens', True)
    if not isinstance(special, bool):
      raise ApiError(400, f'"add_special_tokens" must be a boolean, got {special!r}')
    tok, text = self.run.tokenizer, body['prompt']
    ids = []
    # The special tokens' own strings (tokenizer_info's eos_token, ...) read as those tokens, as Hugging Face
    # tokenizers read them: how a harness finds the EOS id from its string.
    for i, part in enumerate(self._special_split.split(text) if self._special_split else [text]):
      if i % 2:
        ids.append(self._special_ids[part])
      elif part:
        ids.extend(self.run.encode(part))
    if special and self.run.cfg.data.add_bos and tok.bos_id >= 0:
      ids = [tok.bos_id] + ids
    return {'tokens': ids, 'count': len(ids), 'max_model_len': self.run.context_len}

  def detokenize(self, body) -> dict:
    tokens = body.get('tokens') if isinstance(body, dict) else None
    vocab = self.run.cfg.model.vocab_size
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                             for t in tokens)):
      raise ApiError(400, f'"tokens" must be a list of token ids in [0, {vocab})')
    return {'prompt': self.run.text(tokens)}
