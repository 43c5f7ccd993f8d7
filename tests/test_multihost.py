"""Multi-host training for real: 2 processes x 4 CPU devices (jax.distributed over loopback, started by
launch/local.sh) train, checkpoint and stop; 1 process x 8 devices on another mesh resumes; the losses are
those of one uninterrupted run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, tiny_config
from test_distributed import free_port

# A constant learning rate (no warmup, no decay), so that a run stopped at step 4 and extended to 8 follows
# the same schedule as a run of 8 steps.
COMMON = ['train.steps=8', 'train.checkpoint_every=4', 'train.log_every=1', 'eval.every=0',
          'train.warmup_steps=0', 'train.min_lr_ratio=1.0', 'train.learning_rate=0.01']


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  steps = [r['step'] for r in records if r['split'] == 'train']
  assert len(steps) == len(set(steps)), f'metrics written more than once (by more than process 0): {steps}'
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


@pytest.mark.slow
def test_two_processes_train_and_stop_then_one_process_on_another_mesh_resumes(tmp_path, tokenizer_path, capsys):
  from llm_jax.train import loop
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  flags = [f'--config.{kv}' for kv in COMMON] + [f'--config.data.tokenizer={tokenizer_path}']

  # 1. Two processes of 4 devices each, mesh data 2 x fsdp 4: steps 1-4, checkpoint, stop.
  cmd = [os.path.join(ROOT, 'launch', 'local.sh'), '--devices_per_process=4', f'--port={free_port()}',
         f'--log_dir={logs}', '2', '--', sys.executable, '-m', 'llm_jax.cli', 'train', f'--workdir={workdir}',
         f'--config={TINY}', *flags, '--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.train.steps=4',
         '--distributed_timeout=120']
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  logs_text = '\n'.join(p.read_text()[-3000:] for p in sorted(logs.glob('*.log')))
  assert res.returncode == 0, res.stderr[-3000:] + logs_text
  assert 'jax.distributed (flags): 2 processes, 8 devices' in res.stdout
  assert 'finished at step 4' in res.stdout
  # Only process 0 prints progress: process 1's log has no step lines.
  assert 'step      4' in (logs / 'process_0.log').read_text()
  assert 'step ' not in (logs / 'process_1.log').read_text()

  # 2. One process of 8 devices (this one), another mesh shape (fsdp 2 x sequence 2 x tensor 2), resumes to 8.
  config = [tuple(kv.split('=', 1)) for kv in COMMON] + [('data.tokenizer', tokenizer_path)]
  loop.train(tiny_config(*config, ('mesh.data', '1'), ('mesh.fsdp', '2'), ('mesh.sequence', '2'),
                         ('mesh.tensor', '2')), str(workdir))
  out = capsys.readouterr().out
  assert 'resumed from step 4' in out and 'finished at step 8' in out

  # 3. The same 8 steps uninterrupted, in this process, on its 8 devices (data 8).
  reference = tmp_path / 'reference'
  loop.train(tiny_config(*config, ('mesh.data', '8')), str(reference))
  got, want = _losses(workdir), _losses(reference)
  # Step 1 and the first step after a resume are not logged (they include compilation).
  assert sorted(got) == [2, 3, 4, 6, 7, 8] and sorted(want) == [2, 3, 4, 5, 6, 7, 8]
  for step in sorted(got):
    np.testing.assert_allclose(got[step], want[step], rtol=2e-4, err_msg=f'step {step}')
  assert want[8] < want[2] - 0.1  # it did learn: equal losses are not those of an untrained model


def _local(tmp_path, name, *command):
  logs = tmp_path / f'logs_{name}'
  res = subprocess.run([os.path.join(ROOT, 'launch', 'local.sh'), '--devices_per_process=4', f'--port={free_port()}',
                        f'--log_dir={logs}', '2', '--', sys.executable, '-m', 'llm_jax.cli', *command,
                        '--distributed_timeout=120'], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:] + ''.join(p.read_text()[-2000:] for p in logs.glob('*.log'))
  assert (logs / 'process_1.log').read_text().count('loss ') == 0  # only process 0 reports
  return res.stdout


@pytest.mark.slow
def test_eval_and_generate_on_two_processes_equal_one(tmp_path, tokenizer_path, capsys):
  from llm_jax import cli
  from llm_jax.train import loop
  workdir = str(tmp_path / 'run')
  loop.train(tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '3'), ('eval.every', '0'),
                         ('mesh.data', '2'), ('mesh.fsdp', '4')), workdir)
  prompt = ['--prompt=def main():', '--max_new_tokens=6', '--jsonl']

  _local(tmp_path, 'eval', 'eval', f'--workdir={workdir}', f'--output={tmp_path / "eval2.json"}',
         '--max_tokens=3000')
  two_gen = _local(tmp_path, 'gen', 'generate', f'--workdir={workdir}', *prompt)
  assert cli.main(['eval', f'--workdir={workdir}', f'--output={tmp_path / "eval1.json"}', '--max_tokens=3000']) == 0
  assert cli.main(['generate', f'--workdir={workdir}', *prompt]) == 0
  one_gen = capsys.readouterr().out

  one, two = (json.loads((tmp_path / f).read_text()) for f in ('eval1.json', 'eval2.json'))
  assert one['tokens'] == two['tokens'] > 1000 and one['documents'] == two['documents']
  np.testing.assert_allclose(two['loss'], one['loss'], rtol=1e-5)
  np.testing.assert_allclose(two['bits_per_byte'], one['bits_per_byte'], rtol=1e-5)
  tokens = [json.loads(l)['tokens'] for l in one_gen.splitlines() if l.startswith('{')]
  assert tokens and tokens == [json.loads(l)['tokens'] for l in two_gen.splitlines() if l.startswith('{')]
