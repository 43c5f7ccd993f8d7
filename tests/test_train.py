"""Training end to end: resume equals uninterrupted (bit for bit on CPU), and the three commands of a run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, tiny_config

from llm_jax import sharding
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.models import build_model
from llm_jax.train import loop
from llm_jax.train.state import abstract_params


def _params(workdir, cfg):
  ckpt = Checkpointer(str(workdir), create=False)
  step = ckpt.latest_step()
  mesh = sharding.make_mesh(cfg.mesh)
  params = ckpt.restore_params(step, abstract_params(build_model(cfg.model), mesh,
                                                     sharding.rules_from_config(cfg.mesh)))
  ckpt.close()
  return step, jax.device_get(params)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])  # muon: the Quick start's; its state is a partition
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, tokenizer_path, optimizer):
  cfg = tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '12'), ('train.checkpoint_every', '4'),
                    ('train.log_every', '1'), ('eval.every', '5'), ('mesh.data', '2'), ('mesh.fsdp', '2'),
                    ('mesh.tensor', '2'), ('train.optimizer', optimizer))
  loop.train(cfg, str(tmp_path / 'a'))
  loop.train(cfg, str(tmp_path / 'b'), stop_at=6)
  assert _params(tmp_path / 'b', cfg)[0] == 6
  loop.train(cfg, str(tmp_path / 'b'))
  step_a, params_a = _params(tmp_path / 'a', cfg)
  step_b, params_b = _params(tmp_path / 'b', cfg)
  assert step_a == step_b == 12
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  losses_a = {(m['step'], m['split']): m['loss'] for m in _metrics(tmp_path / 'a')}
  losses_b = {(m['step'], m['split']): m['loss'] for m in _metrics(tmp_path / 'b')}
  for key in [(s, 'train') for s in range(8, 13)] + [(10, 'eval')]:
    assert losses_a[key] == losses_b[key], key
  # Training moved the params: the equality above is not the trivial one.
  assert losses_a[(12, 'train')] < losses_a[(2, 'train')]


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)


def test_train_eval_generate_from_the_command_line(tmp_path, tokenizer_path):
  workdir = str(tmp_path / 'run')
  res = _cli('train', f'--workdir={workdir}', f'--config={TINY}', f'--config.data.tokenizer={tokenizer_path}',
             '--config.train.steps=10')
  assert res.returncode == 0, res.stderr
  assert 'step     10' in res.stdout
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl'):
    assert os.path.isfile(os.path.join(workdir, name))
  records = _metrics(workdir)
  assert {'step', 'split', 'loss', 'learning_rate', 'tokens_per_sec'} <= set(records[0])
  assert {r['split'] for r in records} == {'train', 'eval'}

  res = _cli('eval', f'--workdir={workdir}', f'--output={tmp_path / "eval.json"}')
  assert res.returncode == 0, res.stderr
  assert 'bits per byte: llm-jax' in res.stdout and 'gzip -9' in res.stdout and 'xz -9' in res.stdout
  result = json.loads((tmp_path / 'eval.json').read_text())
  assert result['step'] == 10 and result['bits_per_byte'] > 0
  assert abs(result['perplexity'] - np.exp(result['loss'])) < 1e-3 * result['perplexity']

  greedy = [_cli('generate', f'--workdir={workdir}', '--prompt=import os', '--max_new_tokens=8',
                 '--temperature=0') for _ in range(2)]
  assert greedy[0].returncode == 0, greedy[0].stderr
  assert greedy[0].stdout.startswith('import os') and greedy[0].stdout == greedy[1].stdout

  # Training again on the finished workdir resumes instead of starting over.
  res = _cli('train', f'--workdir={workdir}')
  assert res.returncode == 0 and 'already at step 10' in res.stdout


@pytest.mark.parametrize('command', ['eval', 'generate'])
def test_missing_workdir_or_checkpoint_is_one_clear_line(tmp_path, command):
  res = _cli(command, f'--workdir={tmp_path / "nowhere"}')
  assert res.returncode == 2 and res.stderr.strip() == f'llm-jax: error: workdir {tmp_path / "nowhere"} does not exist'
  empty = tmp_path / 'empty'
  empty.mkdir()
  res = _cli(command, f'--workdir={empty}')
  assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and 'Traceback' not in res.stderr


def test_generate_flag_errors(tmp_path):
  res = _cli('generate', f'--workdir={tmp_path}', '--top_p=1.5')
  assert res.returncode == 2 and '--top_p=1.5' in res.stderr and 'Traceback' not in res.stderr
