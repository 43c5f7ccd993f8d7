"""Each family's tiny recipe through the normal commands: `llm-jax train`, `eval` (masked-token accuracy for
BERT, target-token loss for T5, bits per byte for GPT-2) and `generate` (T5 fills sentinel gaps)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)


def _one_line_error(res, needle):
  assert res.returncode == 2, res.stderr
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0] and 'Traceback' not in res.stderr, res.stderr


@pytest.mark.slow
@pytest.mark.parametrize('recipe', ['gpt2_124m', 'bert_base', 't5_small'])
def test_tiny_recipe_trains_evaluates_and_generates(tmp_path, tokenizer_path, recipe):
  workdir = str(tmp_path / recipe)
  res = _cli('train', f'--workdir={workdir}', f'--config={recipe}:tiny',
             f'--config.data.tokenizer={tokenizer_path}', '--config.train.steps=8', '--config.train.log_every=1',
             '--config.eval.every=8', '--config.train.checkpoint_every=8')
  assert res.returncode == 0, res.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r['loss'] for r in records if r['split'] == 'train']
  assert len(train) == 7 and train[-1] < train[0]  # steps 2..8 logged; the model learned something
  assert any(r['split'] == 'eval' for r in records)

  out = tmp_path / 'eval.json'
  res = _cli('eval', f'--workdir={workdir}', f'--output={out}')
  assert res.returncode == 0, res.stderr
  result = json.loads(out.read_text())
  assert result['step'] == 8 and result['tokens'] > 0
  if recipe == 'bert_base':
    assert 'masked-token accuracy' in res.stdout and 0 <= result['masked_token_accuracy'] <= 1
    # About 15% of the held-out tokens are scored, not all of them.
    assert 0.1 < result['masked_tokens'] / (result['bytes'] / 3.5) < 0.3
    assert 'bits_per_byte' not in result
  elif recipe == 't5_small':
    assert 'target loss' in res.stdout and result['target_tokens'] == result['tokens']
  else:
    assert result['bits_per_byte'] > 0

  if recipe == 'bert_base':
    _one_line_error(_cli('generate', f'--workdir={workdir}', '--prompt=x'), 'does not generate text')
    task = tmp_path / 'mc.jsonl'
    task.write_text('{"context": "import ", "choices": ["os", "sys"], "gold": 0}\n')
    _one_line_error(_cli('eval', f'--workdir={workdir}', f'--task={task}'), 'multiple-choice tasks score')
    return
  prompt = 'def f(x):<extra_id_0> x + 1\n' if recipe == 't5_small' else 'import os'
  res = _cli('generate', f'--workdir={workdir}', f'--prompt={prompt}', '--max_new_tokens=6', '--jsonl')
  assert res.returncode == 0, res.stderr
  record = json.loads(res.stdout)
  assert 1 <= len(record['tokens']) <= 6 and record['finish_reason'] in ('stop', 'length')
  if recipe == 't5_small':
    # The prompt is the encoder's input (its sentinel one id, plus EOS); beam search runs the same adapter.
    assert record['prompt_tokens'] == len(_tokens(tokenizer_path, 'def f(x):')) + 1 + len(
        _tokens(tokenizer_path, ' x + 1\n')) + 1
    beams = _cli('generate', f'--workdir={workdir}', f'--prompt={prompt}', '--num_beams=2', '--num_samples=2',
                 '--jsonl')
    assert beams.returncode == 0, beams.stderr
    scores = [json.loads(line)['score'] for line in beams.stdout.splitlines()]
    assert len(scores) == 2 and scores[0] >= scores[1]
    _one_line_error(_cli('serve', f'--workdir={workdir}'), "serve: this run has model.family='encdec'")


def _tokens(tokenizer_path, text):
  from llm_jax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.load(tokenizer_path).encode(text)


def test_encoder_decoder_prompts_read_and_write_sentinels(tokenizer):
  from conftest import recipe_config
  from llm_jax.infer import inference
  from llm_jax.errors import UserError
  cfg = recipe_config('t5_small')
  run = inference.Run(cfg, tokenizer, model=None, params=None, mesh=None, rules=(), step=0)
  first = tokenizer.vocab_size + cfg.data.num_sentinels - 1
  ids = inference.prompt_tokens(run, 'x = <extra_id_0> + <extra_id_7>', max_new_tokens=8)
  assert ids == tokenizer.encode('x = ') + [first] + tokenizer.encode(' + ') + [first - 7, tokenizer.eos_id]
  assert run.text(ids) == 'x = <extra_id_0> + <extra_id_7>'  # EOS is not text
  with pytest.raises(UserError, match=r'<extra_id_100> is not a sentinel of this run \(data.num_sentinels=100\)'):
    run.encode('a<extra_id_100>b')
  with pytest.raises(UserError, match=r"--max_new_tokens=17 is more than the decoder's 16 tokens"):
    inference.prompt_tokens(run, 'x', max_new_tokens=17)
  with pytest.raises(UserError, match=r'the encoder reads 64 \(data.seq_len\)'):
    inference.prompt_tokens(run, 'word ' * 80, max_new_tokens=4)
  kept = inference.prompt_tokens(run, 'word ' * 80, max_new_tokens=4, truncate=True)
  assert len(kept) == 64 and kept[-1] == tokenizer.eos_id
