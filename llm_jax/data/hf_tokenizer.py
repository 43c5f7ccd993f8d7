"""Hugging Face `tokenizers` models (tokenizer.json): byte-level BPE (GPT-2, Llama 3, Qwen), WordPiece (BERT),
Unigram and Metaspace BPE (T5's and Llama 2's fast tokenizers), behind the interface of the sentencepiece
wrapper (tokenizer.py), so training, eval, generate, chat, serve and the data workers use either.

A tokenizer here is its files: tokenizer.json as the checkpoint ships it (bytes kept as they are, so an export
writes back what was imported) and tokenizer_config.json, with special_tokens_map.json and
chat_template.jinja (newer `transformers` save the template there) folded into it. Special ids are read from
those files: the `*_token` entries of tokenizer_config.json / special_tokens_map.json, then what the
tokenizer.json itself says (its post-processor's template, e.g. BERT's [CLS] ... [SEP] or Llama 3's
<|begin_of_text|> ...; its padding token). A BERT-style tokenizer has no bos/eos: its cls/sep are the ids a
document starts and ends with, as its post-processor adds them. Nothing is assumed from token spellings.

Text is encoded without the post-processor's special tokens (the objective adds bos/eos itself, per
data.add_bos / data.add_eos), with truncation and padding off whatever tokenizer.json says (MiniLM's asks for
both at 128).
"""

from __future__ import annotations

import functools
import json
from typing import Iterable, Sequence

import numpy as np

from llm_jax import storage
from llm_jax.errors import UserError

MAGIC = b'llm-jax hf-tokenizer 1\n'  # starts serialized(): never the first bytes of a sentencepiece proto
TOKENIZER_JSON = 'tokenizer.json'
CONFIG = 'tokenizer_config.json'
SPECIAL_MAP = 'special_tokens_map.json'
TEMPLATE_FILE = 'chat_template.jinja'
SPECIAL_NAMES = ('bos', 'eos', 'pad', 'unk', 'mask', 'cls', 'sep')


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
  """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's scheme): bytes
  that are visible Latin-1 characters stand for themselves, the others take code points from 256 up."""
  visible = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in visible:
      out[chr(b)] = b
    else:
      out[chr(256 + extra)] = b
      extra += 1
  return out


def _types(node) -> set[str]:
  """Every component type named in a tokenizer.json section (decoders and pre-tokenizers nest in Sequence)."""
  found = set()
  if isinstance(node, dict):
    if isinstance(node.get('type'), str):
      found.add(node['type'])
    for value in node.values():
      found |= _types(value)
  elif isinstance(node, list):
    for value in node:
      found |= _types(value)
  return found


def _content(value) -> str | None:
  if isinstance(value, dict):  # an AddedToken as transformers saves it
    value = value.get('content')
  return value if isinstance(value, str) and value else None


class HFTokenizer:
  """Picklable: worker processes receive the files' contents, not paths."""

  kind = 'hf'

  def __init__(self, tokenizer_json: bytes, config: dict, where: str = TOKENIZER_JSON):
    from tokenizers import Tokenizer as _Tk
    self._json, self.config, self.where = tokenizer_json, dict(config), where
    try:
      tk = _Tk.from_str(tokenizer_json.decode('utf-8'))
      spec = json.loads(tokenizer_json)
    except Exception as e:  # tokenizers raises a plain Exception on a malformed file
      raise UserError(f'{where} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})') from None
    tk.no_truncation()
    tk.no_padding()
    self._tk = tk
    self.model_type = (spec.get('model') or {}).get('type', '')
    self._decoders = _types(spec.get('decoder')) | _types(spec.get('pre_tokenizer'))
    added = [t for t in spec.get('added_tokens') or [] if isinstance(t, dict)]
    self._special = frozenset(int(t['id']) for t in added if t.get('special'))
    self._added_text = {int(t['id']): t['content'] for t in added if not t.get('special')}
    self._ids = {name: self._special_id(name, spec) for name in SPECIAL_NAMES}
    # A BERT-style vocabulary: documents start with [CLS] and end with [SEP] (its post-processor's template).
    self.bos_id = self._ids['bos'] if self._ids['bos'] >= 0 else self._ids['cls']
    self.eos_id = self._ids['eos'] if self._ids['eos'] >= 0 else self._ids['sep']
    self.pad_id, self.unk_id, self.mask_id = self._ids['pad'], self._ids['unk'], self._ids['mask']
    template = self.config.get('chat_template')
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] (several named templates)
      named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
      template = named.get('default')
    self.chat_template = template if isinstance(template, str) and template.strip() else None

  def _special_id(self, name: str, spec: dict) -> int:
    content = _content(self.config.get(f'{name}_token'))
    if content is not None:
      i = self._tk.token_to_id(content)
      if i is None:
        raise UserError(f'{self.where}: {CONFIG} names {name}_token={content!r}, which the vocabulary does not hold')
      return i
    # Not in the config: what tokenizer.json's own post-processor puts first (bos/cls) and last (eos/sep).
    post = spec.get('post_processor') or {}
    procs = post.get('processors', [post]) if isinstance(post, dict) else []
    for proc in procs:
      single = proc.get('single') if isinstance(proc, dict) else None
      if proc.get('type') == 'TemplateProcessing' and isinstance(single, list) and len(single) > 1:
        first, last = single[0].get('SpecialToken'), single[-1].get('SpecialToken')
        token = {'bos': first, 'cls': first, 'eos': last, 'sep': last}.get(name)
        if token and token.get('id') and self._tk.token_to_id(token['id']) is not None:
          return self._tk.token_to_id(token['id'])
    if name == 'pad' and isinstance(spec.get('padding'), dict):
      i = self._tk.token_to_id(str(spec['padding'].get('pad_token', '')))
      if i is not None:
        return i
    if name == 'unk':
      unk = (spec.get('model') or {}).get('unk_token')
      if isinstance(unk, str) and self._tk.token_to_id(unk) is not None:
        return self._tk.token_to_id(unk)
      unk_id = (spec.get('model') or {}).get('unk_id')  # Unigram names it by id
      if isinstance(unk_id, int):
        return unk_id
    return -1

  # -- what it is and how it travels ---------------------------------------------------------------------

  def files(self) -> dict[str, bytes]:
    """The files that are this tokenizer, as a work directory (and a Hugging Face export) holds them."""
    config = json.dumps(self.config, indent=2, ensure_ascii=False, sort_keys=True) + '\n'
    return {TOKENIZER_JSON: self._json, CONFIG: config.encode('utf-8')}

  def serialized(self) -> bytes:
    body = {'tokenizer_json': self._json.decode('utf-8'), 'config': self.config}
    return MAGIC + json.dumps(body, ensure_ascii=False, sort_keys=True).encode('utf-8')

  @classmethod
  def from_serialized(cls, data: bytes) -> 'HFTokenizer':
    body = json.loads(data[len(MAGIC):].decode('utf-8'))
    return cls(body['tokenizer_json'].encode('utf-8'), body['config'])

  def __getstate__(self):
    return {'data': self.serialized()}

  def __setstate__(self, state):
    other = HFTokenizer.from_serialized(state['data'])
    self.__dict__.update(other.__dict__)

  # -- the interface every backend has -------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and the (start, end) character span of `text` each one covers (chat templates find the
    assistant's tokens with them)."""
    enc = self._tk.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def is_special(self, i: int) -> bool:
    """Special added tokens (bos, eos, pad, chat markers...), the unknown token, and ids past the
    vocabulary: what `decode` leaves out."""
    return i in self._special or i == self.unk_id or not 0 <= i < self.vocab_size

  def decode(self, ids: Iterable[int]) -> str:
    return self._tk.decode([int(i) for i in ids if not self.is_special(int(i))], skip_special_tokens=True)

  @property
  def special_ids(self) -> dict[str, int]:
    """name -> id of the special tokens the files name (bos, eos, pad, unk, mask, cls, sep; -1 where none)."""
    return dict(self._ids)

  def raw_token(self, i: int) -> str:
    """The vocabulary's own spelling of id `i` (as tokenizer.json writes it)."""
    return self._tk.id_to_token(int(i)) or ''

  def token_to_id(self, token: str) -> int:
    i = self._tk.token_to_id(token)
    return -1 if i is None else i

  @functools.cached_property
  def _piece_bytes(self) -> tuple[bytes, ...]:
    chars = _byte_level_chars()
    byte_level = 'ByteLevel' in self._decoders
    wordpiece = 'WordPiece' in self._decoders or self.model_type == 'WordPiece'
    out = []
    for i in range(self.vocab_size):
      piece = self._tk.id_to_token(i)
      if piece is None or i in self._special:
        out.append(b'')
      elif i in self._added_text:  # added, not special: its text as written
        out.append(self._added_text[i].encode('utf-8'))
      elif byte_level:
        out.append(bytes(chars.get(c, 0x3f) for c in piece))
      elif wordpiece:  # '##' continues a word; any other piece is a new word after a space
        out.append(piece[2:].encode('utf-8') if piece.startswith('##') else b' ' + piece.encode('utf-8'))
      elif len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):  # byte fallback
        out.append(bytes([int(piece[3:5], 16)]))
      else:  # Metaspace (Unigram, Llama 2's BPE): '▁' is a space
        out.append(piece.replace('\u2581', ' ').encode('utf-8'))
    return tuple(out)

  def piece_bytes(self, i: int) -> bytes:
    """The bytes id `i` adds to decoded text (stop strings are matched on these)."""
    return self._piece_bytes[i] if 0 <= i < self.vocab_size else b''

  def id_to_piece(self, i: int) -> str:
    """The piece in sentencepiece's spelling ('▁' where a word starts after a space), which whole-word
    masking reads word boundaries from."""
    text = self.piece_bytes(i).decode('utf-8', errors='replace')
    return '\u2581' + text[1:] if text.startswith(' ') else text


def read_files(directory: str) -> tuple[bytes, dict]:
  """tokenizer.json's bytes and the tokenizer config (special_tokens_map.json's entries and
  chat_template.jinja folded in) of a Hugging Face model directory or a work directory."""
  path = storage.join(directory, TOKENIZER_JSON)
  try:
    raw = storage.read_bytes(path)
  except OSError as e:
    raise UserError(f'cannot read tokenizer {path}: {e.strerror or e}') from None
  config = _read_json(storage.join(directory, CONFIG))
  for key, value in _read_json(storage.join(directory, SPECIAL_MAP)).items():
    if key.endswith('_token') and key not in config:
      config[key] = value
  template_path = storage.join(directory, TEMPLATE_FILE)
  if 'chat_template' not in config and storage.isfile(template_path):
    with storage.open(template_path) as f:
      config['chat_template'] = f.read()
  return raw, config


def _read_json(path: str) -> dict:
  return storage.read_json(path) if storage.isfile(path) else {}


def load_dir(directory: str) -> HFTokenizer:
  raw, config = read_files(directory)
  tok = HFTokenizer(raw, config, storage.join(directory, TOKENIZER_JSON))
  if tok.vocab_size <= len(tok._special):
    raise UserError(f'{tok.where}: a tokenizer of {tok.vocab_size} tokens is too small')
  return tok
