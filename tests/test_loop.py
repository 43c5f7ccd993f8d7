"""The loop's guard rails and reporting: metrics keys and sinks, profiles, the NaN stop that keeps the last
good checkpoint, skipping bad steps, and SIGTERM / SIGINT that checkpoint and exit."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, tiny_config

from llm_jax import sharding
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import loop
from llm_jax.train.state import abstract_params

TRAIN_KEYS = {'step', 'split', 'loss', 'z_loss', 'learning_rate', 'grad_norm', 'param_norm', 'tokens_per_sec',
              'step_time', 'mfu'}


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _checkpoints(workdir, cfg):
  """{step: all params finite} of every checkpoint in the workdir."""
  ckpt = Checkpointer(str(workdir), create=False)
  mesh = sharding.make_mesh(cfg.mesh)
  target = abstract_params(build_model(cfg.model), mesh, sharding.rules_from_config(cfg.mesh))
  out = {s: all(np.all(np.isfinite(p)) for p in jax.tree.leaves(jax.device_get(ckpt.restore_params(s, target))))
         for s in ckpt.all_steps()}
  ckpt.close()
  return out


@pytest.mark.slow
def test_metrics_sinks_and_profile_of_a_run(tmp_path, tokenizer_path):
  cfg = tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '6'), ('train.log_every', '2'),
                    ('eval.every', '3'), ('train.profile_steps', '(2, 3)'), ('train.z_loss', '1e-4'),
                    ('train.microbatches', '2'), ('train.loss_chunk', '16'), ('mesh.tensor', '2'))
  workdir = tmp_path / 'run'
  loop.train(cfg, str(workdir))
  records = _metrics(workdir)
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [2, 4, 6]
  assert all(set(r) == TRAIN_KEYS for r in train)
  assert all(r['mfu'] is None for r in train)  # CPU: no known peak, so null rather than a made-up number
  assert all(r['z_loss'] > 0 and r['param_norm'] > 0 and r['tokens_per_sec'] > 0 for r in train)
  assert [(r['step'], r['split']) for r in records if r['split'] == 'eval'] == [(3, 'eval'), (6, 'eval')]
  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1 and events[0].stat().st_size > 200
  traces = list((workdir / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000


def _exploding(tokenizer_path, *extra):
  # The learning rate reaches 1e30 two updates in: the parameters blow up, a few steps later the loss is
  # inf / NaN. A checkpoint every step means the guard, not luck, decides what gets saved.
  return tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '7'), ('train.warmup_steps', '4'),
                     ('train.learning_rate', '1e30'), ('train.grad_clip', '0'), ('train.checkpoint_every', '1'),
                     ('train.keep_checkpoints', '20'), ('train.log_every', '1'), ('eval.every', '0'), *extra)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path):
  cfg = _exploding(tokenizer_path)
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match=r'became non-finite at step (\d+); stopping \(the last good checkpoint '
                                      r'is step (\d+) in ') as err:
    loop.train(cfg, str(workdir))
  bad, good = map(int, re.search(r'step (\d+); .* step (\d+) in', str(err.value)).groups())
  assert good == bad - 1
  saved = _checkpoints(workdir, cfg)
  assert max(saved) == good and all(saved.values())  # nothing at or after the bad step, all finite
  logged = [r['step'] for r in _metrics(workdir) if r['split'] == 'train']
  assert logged and max(logged) < bad  # the non-finite step is reported by the error, not as a metric


def test_skip_nonfinite_skips_and_counts_instead_of_stopping(tmp_path, tokenizer_path):
  cfg = _exploding(tokenizer_path, ('train.skip_nonfinite', 'true'))
  workdir = tmp_path / 'run'
  result = loop.train(cfg, str(workdir))
  assert result['step'] == 7
  train = [r for r in _metrics(workdir) if r['split'] == 'train']
  skipped = [r['skipped'] for r in train]
  assert skipped == sorted(skipped) and skipped[-1] >= 1
  nonfinite = sum(not np.isfinite(r['loss']) or not np.isfinite(r['grad_norm']) for r in train)
  assert skipped[-1] == nonfinite
  assert all(_checkpoints(workdir, cfg).values())


def _launch(workdir, tokenizer_path, stderr_path):
  cmd = [sys.executable, '-m', 'llm_jax.cli', 'train', f'--workdir={workdir}', f'--config={TINY}',
         f'--config.data.tokenizer={tokenizer_path}', '--config.train.steps=100000',
         '--config.train.log_every=1', '--config.eval.every=0', '--config.train.checkpoint_every=100000']
  # stderr to a file: a pipe nobody reads while we wait for stdout lines could fill up and stall the run.
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(stderr_path, 'w'), text=True,
                          bufsize=1)


def _interrupt_after_steps(proc, sig, steps=3, timeout=240):
  deadline = time.time() + timeout
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step') and int(line.split()[1]) >= steps:
      break
    assert time.time() < deadline, lines
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=timeout)
  return ''.join(lines) + out


@pytest.mark.slow
def test_sigterm_and_sigint_checkpoint_the_current_step_and_exit(tmp_path, tokenizer_path):
  workdir, err_path = tmp_path / 'run', tmp_path / 'stderr'
  proc = _launch(workdir, tokenizer_path, err_path)
  out = _interrupt_after_steps(proc, signal.SIGTERM)
  err = err_path.read_text()
  assert proc.returncode == 128 + signal.SIGTERM, err
  first = Checkpointer(str(workdir), create=False)
  steps = first.all_steps()
  first.close()
  assert len(steps) == 1 and steps[0] >= 3  # not a periodic checkpoint: every 100000 steps
  assert f'stopped by SIGTERM at step {steps[0]}: checkpoint saved' in out, out
  assert 'received SIGTERM' in err and 'Traceback' not in err

  proc = _launch(workdir, tokenizer_path, err_path)
  out = _interrupt_after_steps(proc, signal.SIGINT, steps=steps[0] + 2)
  assert proc.returncode == 128 + signal.SIGINT, err_path.read_text()
  assert f'resumed from step {steps[0]}' in out
  again = Checkpointer(str(workdir), create=False)
  later = again.all_steps()
  again.close()
  assert max(later) >= steps[0] + 2 and f'stopped by SIGINT at step {max(later)}' in out
