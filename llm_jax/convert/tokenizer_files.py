"""The tokenizer of a conversion, both ways: which tokenizer a Hugging Face checkpoint directory ships (and
so which files the work directory gets), and the files an export writes so that
`transformers.AutoTokenizer.from_pretrained` (and lm-evaluation-harness's `hf` model) loads it with nothing
else: tokenizer.json or tokenizer.model / spiece.model, and tokenizer_config.json naming the tokenizer
class, its special tokens and its chat template.

A checkpoint that ships both a sentencepiece model and tokenizer.json (Llama 2, T5) is read with the
sentencepiece model (data/tokenizer.py BACKENDS), unless its tokenizer_config.json carries a chat template:
the template is read with tokenizer.json, the backend that keeps tokenizer_config.json.
"""

from __future__ import annotations

import json
import os

from llm_jax.data import hf_tokenizer, tokenizer as tokenizer_lib

# The slow-tokenizer class transformers builds from a sentencepiece file, per architecture (model_type).
_SENTENCEPIECE_CLASS = {'t5': ('spiece.model', 'T5Tokenizer')}
_DEFAULT_SENTENCEPIECE = ('tokenizer.model', 'LlamaTokenizer')


def from_checkpoint(hf_dir: str):
  """The tokenizer a Hugging Face directory ships, or None when it has none llm-jax reads."""
  json_path = os.path.join(hf_dir, hf_tokenizer.TOKENIZER_JSON)
  if os.path.isfile(json_path):
    raw, config = hf_tokenizer.read_files(hf_dir)
    if config.get('chat_template') or tokenizer_lib.find(hf_dir) == json_path:
      return hf_tokenizer.load_dir(hf_dir)
  path = tokenizer_lib.find(hf_dir)
  return tokenizer_lib.load(path) if path else None


def describe(tok) -> str:
  if tok is None:
    return 'without a tokenizer (give one with --config.data.tokenizer=PATH before training)'
  if tok.kind == 'sentencepiece':
    return 'with its sentencepiece tokenizer'
  return f'with its Hugging Face tokenizer ({tok.model_type}, {tok.vocab_size:,} tokens)'


def _special_contents(tok) -> dict[str, str]:
  """{'bos_token': '<s>', ...} for the special ids the tokenizer has."""
  out = {}
  for name in ('bos', 'eos', 'pad', 'unk'):
    i = getattr(tok, f'{name}_id')
    if i >= 0:
      out[f'{name}_token'] = tok.id_to_piece(i)
  return out


def _sentencepiece_kind(tok) -> tuple[bool, bool]:
  """(a Unigram model, adds a space before the text) of a sentencepiece model."""
  try:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.serialized())
    return (proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM,
            proto.normalizer_spec.add_dummy_prefix)
  except Exception:  # no protobuf (or one that cannot read the file): ask the model how it encodes
    return False, tok.piece_bytes(tok.encode('x')[0]).startswith(b' ')


def export_files(tok, model_type: str) -> dict[str, bytes]:
  """name -> bytes of the tokenizer files of a Hugging Face export."""
  if tok.kind == 'sentencepiece':
    unigram, prefix_space = _sentencepiece_kind(tok)
    # transformers builds T5Tokenizer as a Unigram model and LlamaTokenizer as BPE, whatever the file holds,
    # and puts a space before the text unless told (sentencepiece's add_dummy_prefix).
    cls = 'T5Tokenizer' if model_type == 't5' and unigram else 'LlamaTokenizer'
    name = 'spiece.model' if cls == 'T5Tokenizer' else 'tokenizer.model'
    config = {'tokenizer_class': cls, 'add_prefix_space': prefix_space, 'legacy': False,
              **_special_contents(tok)}
    if cls == 'LlamaTokenizer':  # a decoder's documents start with bos; T5's end with eos
      config.update(add_bos_token=model_type != 't5' and tok.bos_id >= 0, add_eos_token=model_type == 't5')
    return {name: tok.serialized(), hf_tokenizer.CONFIG: _json(config)}
  files = dict(tok.files())
  config = dict(tok.config)
  # A tokenizer without a class of its own (one trained with the `tokenizers` library) is the generic fast
  # tokenizer: transformers then reads tokenizer.json as it is, whatever the model's family.
  config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
  for name in hf_tokenizer.SPECIAL_NAMES:
    key = f'{name}_token'
    i = tok.special_ids.get(name, -1)
    named = {hf_tokenizer._content(v) for k, v in config.items() if k.endswith('_token')}
    if key not in config and i >= 0 and tok.raw_token(i) not in named:  # BERT's [CLS] stays cls, not bos
      config[key] = tok.raw_token(i)
  files[hf_tokenizer.CONFIG] = _json(config)
  return files


def _json(value: dict) -> bytes:
  return (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + '\n').encode('utf-8')


def write(directory: str, files: dict[str, bytes]) -> None:
  for name, data in files.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(data)
