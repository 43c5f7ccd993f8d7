"""Hugging Face tokenizers trained in the tests with the `tokenizers` library (offline, in a second), saved as
a model directory holds them: tokenizer.json and tokenizer_config.json. Shared by the tokenizer parity tests,
the chat-template tests and the end-to-end conversions."""

import inspect
import json
import os

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers


def varied_lines() -> list[str]:
  """A few hundred lines of the text a tokenizer meets: code, prose with accents, emoji, other scripts,
  runs of spaces and tabs, digits and punctuation."""
  import json.decoder as jd
  import textwrap
  code = [line for line in inspect.getsource(jd).splitlines() + inspect.getsource(textwrap).splitlines()
          if line.strip()][:220]
  prose = [
      'Café au lait, naïve façade, Zürich und São Paulo: déjà vu.',
      'Ελληνικά κείμενα και русский текст рядом.',
      '日本語のテキストと中文文本，还有한국어 문장.',
      'Emoji 🙂🚀👍🏽 and flags 🇫🇷🇯🇵 in a row 👩‍👩‍👧‍👦!',
      'tabs\there\t\tand   runs    of     spaces      end   ',
      '    indented four; then eight:        x = 1',
      'numbers 1234567890, 3.14159, -2e-10 and 0xDEADBEEF',
      "quotes 'single' \"double\" `back` «guillemets» „low“",
      'math ∑ ∫ √ ≤ ≥ ≠ ∞ and arrows → ← ↔',
      'URL https://example.com/path?q=1&x=%20 and mail a.b@c.org',
      'MiXeD CaSe WoRdS and ALLCAPS and lowercase',
      'a line with a trailing newline inside\nand its second half',
  ]
  out = []
  for i in range(8):
    out += [f'{p} {i}' if i % 2 else p for p in prose]
  return code + out


def _special(names):
  return [tokenizers.AddedToken(n, special=True, normalized=False) for n in names]


def train_byte_level_bpe(lines, vocab_size=600) -> tokenizers.Tokenizer:
  """GPT-2 / Llama 3 / Qwen style: bytes mapped to visible characters, BPE merges, lossless."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_special(['<|endoftext|>']),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(lines, trainer)
  return tok


def train_wordpiece(lines, vocab_size=600) -> tokenizers.Tokenizer:
  """BERT style: lower-cased, accents stripped, [CLS] ... [SEP] added by its post-processor."""
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                      special_tokens=_special(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']))
  tok.train_from_iterator(lines, trainer)
  cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  tok.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
                                                     special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
  return tok


def train_unigram(lines, vocab_size=600) -> tokenizers.Tokenizer:
  """T5's fast tokenizer: Unigram over Metaspace ('▁' marks a space)."""
  tok = tokenizers.Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False, unk_token='<unk>',
                                    special_tokens=_special(['<pad>', '</s>', '<unk>']))
  tok.train_from_iterator(lines, trainer)
  return tok


def save(tok: tokenizers.Tokenizer, directory: str, config: dict) -> str:
  """tokenizer.json and tokenizer_config.json in `directory`, as a checkpoint ships them."""
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', **config}, f)
  return directory


KINDS = {
    'byte_level_bpe': (train_byte_level_bpe, {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'}),
    'wordpiece': (train_wordpiece, {'unk_token': '[UNK]', 'pad_token': '[PAD]', 'cls_token': '[CLS]',
                                    'sep_token': '[SEP]', 'mask_token': '[MASK]'}),
    'unigram': (train_unigram, {'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>'}),
}


def make(kind: str, directory: str, lines=None, extra_config=None) -> str:
  train, config = KINDS[kind]
  return save(train(lines or varied_lines()), directory, {**config, **(extra_config or {})})
