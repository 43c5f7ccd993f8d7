"""Tokenizers through a conversion: `convert to-hf` writes what `transformers.AutoTokenizer.from_pretrained`
loads for every family and tokenizer kind (the same ids, the same special tokens, the chat template), and
`convert from-hf` brings a checkpoint's tokenizer.json back into the work directory."""

import os

import jax
import pytest
import transformers

import hf_tokenizers
from conftest import recipe_config, tiny_config
from llm_jax import config as config_lib, convert
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.models import build_model
from llm_jax.train.state import init_params

LINES = hf_tokenizers.varied_lines()[::9]


def _workdir(path, cfg, tok) -> str:
  """A run's directory holding the config's random initial params and the tokenizer's files."""
  os.makedirs(path)
  config_lib.write_json_atomic(cfg, workdir_lib.config_path(path))
  tokenizer_lib.write_files(tok, path)
  model = build_model(cfg.model)
  params = jax.jit(lambda: init_params(model, jax.random.PRNGKey(1)))()
  ckpt = Checkpointer(path, async_save=False)
  ckpt.save_params(1, params, cfg.to_dict())
  ckpt.close()
  return path


CASES = {  # recipe, tokenizer kind ('sentencepiece': the tests' shared model), HF tokenizer class written
    'llama-sentencepiece': ('tiny', 'sentencepiece'),
    'llama-byte_level_bpe': ('tiny', 'byte_level_bpe'),
    'gpt2-byte_level_bpe': ('gpt2_124m', 'byte_level_bpe'),
    'bert-wordpiece': ('bert_base', 'wordpiece'),
    't5-sentencepiece': ('t5_small', 'sentencepiece'),
    't5-unigram': ('t5_small', 'unigram'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_an_export_loads_in_transformers_with_its_tokenizer(case, tmp_path, tokenizer_path):
  recipe, kind = CASES[case]
  if kind == 'sentencepiece':
    tok = tokenizer_lib.load(tokenizer_path)
  else:
    extra = {'chat_template': '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}'}
    tok = tokenizer_lib.load(hf_tokenizers.make(kind, str(tmp_path / 'tok'), extra_config=extra))
  base = tiny_config() if recipe == 'tiny' else recipe_config(recipe)
  vocab = tok.vocab_size + config_lib.reserved_ids(base.data, tok)
  cfg = config_lib.load(None, [('model.vocab_size', str(max(vocab, 512)))], base=base)
  run = _workdir(str(tmp_path / 'run'), cfg, tok)
  convert.to_hf(run, str(tmp_path / 'hf'))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  for line in LINES:
    assert tok.encode(line) == theirs(line, add_special_tokens=False)['input_ids'], line
  for name in ('pad', 'unk'):
    want = getattr(theirs, f'{name}_token_id')
    assert getattr(tok, f'{name}_id') == (-1 if want is None else want), name
  assert tok.eos_id == (theirs.sep_token_id if kind == 'wordpiece' else theirs.eos_token_id)
  if kind != 'sentencepiece':
    assert theirs.chat_template == tok.chat_template
    # ... and back: from-hf reads the tokenizer.json the export wrote.
    convert.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'), say=lambda msg: None)
    back = workdir_lib.load_tokenizer(str(tmp_path / 'back'), workdir_lib.load_config(str(tmp_path / 'back')))
    assert back.kind == 'hf' and back.encode(LINES[0]) == tok.encode(LINES[0])
    assert back.chat_template == tok.chat_template
