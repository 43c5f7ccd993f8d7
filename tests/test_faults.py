"""Fault injection: real `llm-jax train` processes killed with SIGKILL at random moments and in the middle of a
save, stopped with SIGTERM, resumed from a damaged newest checkpoint, run on a full and on a read-only
filesystem, losing their data files mid-run, and pointed at a coordinator that is not there. Each test says
what survives on disk and what the user sees.

Marked `faults`: `pytest -m faults` runs only these, `pytest -m 'not faults'` leaves them out; the README's
test command (and so CI) runs them with everything else. Subprocesses share a persistent compilation cache,
so only the first one of a test session pays for compiling the train step.
"""

import glob
import json
import os
import queue
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, tiny_config

from llm_jax import sharding
from llm_jax.run import checkpoint_files
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.data import files as files_lib
from llm_jax.data.streams import Stream
from llm_jax.data.packing import Packer
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train.state import abstract_params

pytestmark = pytest.mark.faults

RUNNER = os.path.join(ROOT, 'tests', 'fault_runner.py')
COMPARED = ('loss', 'z_loss', 'learning_rate', 'grad_norm', 'param_norm')


@pytest.fixture(scope='session')
def fault_env(tmp_path_factory):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


class _Train:
  """`llm-jax train` in a subprocess (through fault_runner.py), its stdout read line by line as it comes."""

  def __init__(self, args, env, stderr_path, pause_commit_at=0):
    cmd = [sys.executable, RUNNER, str(pause_commit_at), 'train', *args]
    # stderr to a file: a pipe nobody reads while we wait for stdout lines could fill up and stall the run.
    self.stderr_path = stderr_path
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=open(stderr_path, 'w'), text=True)
    self.lines = []
    self._queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def wait_for(self, predicate, timeout=240):
    deadline = time.time() + timeout
    while True:
      line = self._queue.get(timeout=max(deadline - time.time(), 0.1))
      assert line is not None, f'exited ({self.proc.wait()}) first: {self.lines} {self.stderr}'
      self.lines.append(line)
      if predicate(line):
        return line

  def wait_for_step(self, step):
    return self.wait_for(lambda line: line.startswith('step') and int(line.split()[1]) >= step)

  def finish(self, timeout=300):
    rc = self.proc.wait(timeout=timeout)
    while (line := self._queue.get(timeout=30)) is not None:
      self.lines.append(line)
    return rc

  @property
  def stdout(self):
    return ''.join(self.lines)

  @property
  def stderr(self):
    with open(self.stderr_path) as f:
      return f.read()


def _train_args(workdir, tokenizer_path, *extra):
  return [f'--workdir={workdir}', f'--config={TINY}', f'--config.data.tokenizer={tokenizer_path}', *extra]


def _committed(workdir):
  """Every committed step, each checked against its manifest."""
  directory = os.path.join(str(workdir), 'checkpoints')
  ckpt = Checkpointer(str(workdir), create=False)
  steps = ckpt.all_steps()
  ckpt.close()
  for s in steps:
    assert checkpoint_files.check_step(directory, s) == (True, None), s
  return steps


def _params(workdir, cfg):
  ckpt = Checkpointer(str(workdir), create=False)
  mesh = sharding.make_mesh(cfg.mesh)
  step, params = ckpt.restore_latest_params(abstract_params(build_model(cfg.model), mesh,
                                                            sharding.rules_from_config(cfg.mesh)))
  ckpt.close()
  return step, jax.device_get(params)


def _records(workdir):
  with open(os.path.join(str(workdir), 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]  # every line whole: no record glued to a cut-off one


# ---------------------------------------------------------------------------------------------------------
# kill -9, SIGTERM and a damaged newest step, one after the other in one run: it still ends bit for bit
# where an uninterrupted run ends.

KILL_RUN = ('--config.train.steps=16', '--config.train.checkpoint_every=2', '--config.train.log_every=1',
            '--config.eval.every=5')


@pytest.mark.slow
def test_kill_9_anywhere_sigterm_and_a_damaged_step_still_end_in_the_uninterrupted_run(
    tmp_path, tokenizer_path, fault_env):
  # Another seed, other kill points: LLM_JAX_FAULT_SEED=N pytest -m faults -k kill (loop it to stress).
  rng = random.Random(int(os.environ.get('LLM_JAX_FAULT_SEED', '10')))
  cfg = tiny_config(('data.tokenizer', tokenizer_path), *(tuple(a[len('--config.'):].split('=')) for a in KILL_RUN))
  workdir, err = tmp_path / 'run', tmp_path / 'stderr'
  directory = workdir / 'checkpoints'
  args = _train_args(workdir, tokenizer_path, *KILL_RUN)

  def start(**kw):
    leftovers = checkpoint_files.incomplete_saves(str(directory))
    run = _Train(args, fault_env, err, **kw)
    return run, leftovers

  def started_cleanly(run, leftovers, steps):
    if steps:
      assert f'resumed from step {max(steps)} of {workdir}' in run.stdout
    if leftovers:
      assert f'removing incomplete checkpoint saves in {directory}: {", ".join(leftovers)}' in run.stderr

  # 1, 2. SIGKILL at random moments after random progress lines: mid-step, mid-save, mid-log, ...
  steps = []
  for _ in range(2):
    run, leftovers = start()
    run.wait_for_step((max(steps) if steps else 0) + rng.randint(2, 4))
    time.sleep(rng.uniform(0.0, 0.4))
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    started_cleanly(run, leftovers, steps)
    steps = _committed(workdir)  # every committed step whole, wherever the kill landed
  # The uninterrupted run, now that the first process filled the compilation cache.
  reference = _Train(_train_args(tmp_path / 'reference', tokenizer_path, *KILL_RUN), fault_env,
                     tmp_path / 'ref_err')
  assert reference.finish() == 0, reference.stderr

  # 3. SIGKILL while the next checkpoint is being committed: all its files written, not yet renamed.
  pause = (max(steps) if steps else 0) + 2
  run, leftovers = start(pause_commit_at=pause)
  run.wait_for(lambda line: line.startswith('fault_runner: pausing'))
  run.proc.kill()
  assert run.finish() == -signal.SIGKILL
  started_cleanly(run, leftovers, steps)
  assert f'{pause}{checkpoint_files.TMP_MARK}' in os.listdir(directory)
  steps = _committed(workdir)
  assert all(s < pause for s in steps)  # the interrupted save is not a step

  # 4. SIGTERM: the step finishes, a checkpoint is written, exit 128 + 15.
  run, leftovers = start()
  run.wait_for_step(pause + rng.randint(1, 2))
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 128 + signal.SIGTERM
  started_cleanly(run, leftovers, steps)
  assert f'{pause}{checkpoint_files.TMP_MARK}' in ', '.join(leftovers)
  steps = _committed(workdir)
  stopped = max(steps)
  assert f'stopped by SIGTERM at step {stopped}: checkpoint saved' in run.stdout
  assert not checkpoint_files.incomplete_saves(str(directory))

  # 5. The newest step damaged on disk: the run falls back to the one before, and finishes.
  before = sorted(steps)[-2]
  damaged = max(glob.glob(str(directory / str(stopped) / 'train' / '**' / 'd' / '*'), recursive=True),
                key=os.path.getsize)
  with open(damaged, 'r+b') as f:
    f.truncate(10)
  run = _Train(args, fault_env, err)
  assert run.finish() == 0, run.stderr
  rel = os.path.relpath(damaged, directory / str(stopped))
  assert f'checkpoint step {stopped} in {directory} cannot be read ({rel} has 10 bytes' in run.stderr
  assert f'using step {before} instead; moved aside to checkpoints/{stopped}.damaged' in run.stderr
  assert f'resumed from step {before} of {workdir}' in run.stdout and 'Traceback' not in run.stderr

  # What survives is the same run: the final params bit for bit, and every logged record of every
  # invocation, killed ones included, equal to the uninterrupted run's record of that step.
  step_a, params_a = _params(tmp_path / 'reference', cfg)
  step_b, params_b = _params(workdir, cfg)
  assert step_a == step_b == 16
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  reference = {(r['step'], r['split']): r for r in _records(tmp_path / 'reference')}
  records = _records(workdir)
  assert {(16, 'train'), (16, 'eval'), (15, 'eval')} <= {(r['step'], r['split']) for r in records}
  for r in records:
    ref = reference[(r['step'], r['split'])]
    assert {k: r[k] for k in COMPARED if k in r} == {k: ref[k] for k in COMPARED if k in ref}, r['step']


def test_a_record_cut_off_by_a_kill_is_dropped_before_the_resumed_run_appends(tmp_path):
  from llm_jax.run.workdir import MetricsWriter
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
  MetricsWriter(str(tmp_path)).write({'step': 2, 'split': 'train', 'loss': 1.5})
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2]


def test_metrics_that_cannot_be_written_are_one_line(tmp_path):
  from llm_jax.train.sinks import Sinks
  sinks = Sinks(str(tmp_path), tiny_config().train, {})
  (tmp_path / 'metrics.jsonl').mkdir()  # whatever the reason, the append fails
  with pytest.raises(UserError, match=f'cannot write metrics to {tmp_path}: Is a directory'):
    sinks.write({'step': 1, 'split': 'train', 'loss': 1.0})
  sinks.close()


# ---------------------------------------------------------------------------------------------------------
# Full and read-only filesystems: a real tmpfs and a read-only bind mount in a private mount namespace.


def _namespaces_work():
  if shutil.which('unshare') is None:
    return False
  res = subprocess.run(['unshare', '-Urm', 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'],
                       capture_output=True, timeout=30)
  return res.returncode == 0


@pytest.mark.slow
def test_full_and_read_only_workdirs(tmp_path, tokenizer_path, fault_env):
  if not _namespaces_work():
    pytest.skip('needs `unshare -Urm` (user + mount namespaces) to mount a small tmpfs; test_checkpoint.py '
                'covers failing saves with a patched writer')
  tiny, full, out = tmp_path / 'tiny_fs', tmp_path / 'full_fs', tmp_path / 'out'
  for d in (tiny, full, out):
    d.mkdir()
  train = [sys.executable, '-m', 'llm_jax.cli', 'train']
  args = ['--config.train.steps=8', '--config.train.checkpoint_every=2', '--config.train.log_every=1',
          '--config.eval.every=0']

  def sh(name, argv):
    quoted = ' '.join(shlex.quote(str(a)) for a in argv)
    return f'{quoted} > {out}/{name}.out 2> {out}/{name}.err; echo $? > {out}/{name}.rc'

  steps = [
      # 1 MiB: config and tokenizer fit, one checkpoint (about 1.7 MiB) does not: refused before training.
      f'mount -t tmpfs -o size=1m tmpfs {tiny}',
      sh('tiny', train + _train_args(tiny / 'w', tokenizer_path, *args)),
      # 3 MiB: the first checkpoint fits, the second does not.
      f'mount -t tmpfs -o size=3m tmpfs {full}',
      sh('full', train + _train_args(full / 'w', tokenizer_path, *args)),
      f'cp -a {full}/w {out}/after_full',
      # Space freed: the same command resumes from what survived.
      f'mount -o remount,size=64m {full}',
      sh('resumed', train + _train_args(full / 'w', tokenizer_path, *args)),
      # Read-only: training more is refused before anything is written; reading works.
      f'mount --bind {full}/w {full}/w && mount -o remount,bind,ro {full}/w',
      sh('ro_train', train + [f'--workdir={full}/w', '--config.train.steps=12']),
      sh('ro_eval', [sys.executable, '-m', 'llm_jax.cli', 'eval', f'--workdir={full}/w']),
      f'cp -a {full}/w {out}/after_ro',
  ]
  script = '\n'.join(steps)
  res = subprocess.run(['unshare', '-Urm', 'sh', '-c', script], cwd=ROOT, env=fault_env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr

  def result(name):
    return int((out / f'{name}.rc').read_text()), (out / f'{name}.out').read_text(), (out / f'{name}.err').read_text()

  rc, _, err = result('tiny')
  assert rc == 2 and err.count('\n') == 1, err
  assert err.startswith(f'llm-jax: error: {tiny}/w/checkpoints has ') and 'one checkpoint of this run needs about' in err

  rc, stdout, err = result('full')
  assert rc == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
  assert err.startswith('llm-jax: error: cannot write ') and 'No space left on device' in err
  survived = _committed(out / 'after_full')
  assert survived and not checkpoint_files.incomplete_saves(str(out / 'after_full' / 'checkpoints'))
  if 'cannot write the checkpoint of step' in err:
    assert f'the newest complete checkpoint, step {max(survived)}, is intact' in err

  rc, stdout, err = result('resumed')
  assert rc == 0, err
  assert f'resumed from step {max(survived)} of {full}/w' in stdout and 'finished at step 8' in stdout

  rc, stdout, err = result('ro_train')
  assert rc == 2 and err == f'llm-jax: error: cannot write to workdir {full}/w: Read-only file system\n'
  rc, stdout, err = result('ro_eval')
  assert rc == 0 and stdout.startswith('step 8: '), err
  assert max(_committed(out / 'after_ro')) == 8  # nothing of the refused run was written
  assert json.loads((out / 'after_ro' / 'config.json').read_text())['train']['steps'] == 8


# ---------------------------------------------------------------------------------------------------------
# Data files that disappear while the run reads them.


def test_all_documents_unusable_is_an_error_not_an_endless_loop():
  stream = Stream(('ids',), 4)
  gone = files_lib.Skipped('corpus/a.txt', 'unreadable', 'cannot read: No such file or directory')
  seen = []

  def feed(start):
    while True:  # an endless training feed whose every document is gone
      yield gone

  packer = Packer((stream,), feed, seen.append, max_skips=50)
  out = {key: np.zeros((1, 4), np.int32) for key in ('ids', 'segment_ids', 'positions')}
  with pytest.raises(UserError, match=r'50 documents in a row could not be used \(the last: corpus/a.txt: cannot '
                                      r'read: No such file or directory\): no usable training data is left'):
    packer.fill(out, 0)
  assert len(seen) == 50


@pytest.mark.slow
def test_data_files_deleted_mid_run(tmp_path, tokenizer_path, small_corpus, fault_env):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for path in sorted(glob.glob(small_corpus))[:24]:
    shutil.copy(path, corpus)
  workdir = tmp_path / 'run'
  common = _train_args(workdir, tokenizer_path, f'--config.data.source={corpus}/*.txt',
                       '--config.data.heldout_percent=10', '--config.data.prefetch=1', '--config.eval.every=0',
                       '--config.train.log_every=1', '--config.train.checkpoint_every=8')

  # Four files go after step 2 (at most one of each shard's documents: shard s reads documents s, s + 8,
  # ...): they are skipped with a warning naming them, and the run ends. The shards cycle through their few
  # small documents every handful of steps, so the run reads the deleted ones again however late the deletion
  # lands; 160 steps leave room for this (test) process to be slow to act on step 2 on a busy machine.
  run = _Train(common + ['--config.train.steps=160'], fault_env, tmp_path / 'err1')
  run.wait_for_step(2)
  removed = sorted(corpus.iterdir())[:4]
  for path in removed:
    path.unlink()
  assert run.finish() == 0, run.stderr
  warnings = [line for line in run.stderr.splitlines() if line.startswith('llm-jax: warning: skipped ')]
  assert warnings and all(': cannot read: No such file or directory' in w for w in warnings)
  assert any(str(p) in w for p in removed for w in warnings)
  assert run.stderr.splitlines()[-1].startswith('llm-jax: data: skipped ') and 'unreadable' in run.stderr
  assert max(_committed(workdir)) == 160

  # Then the rest go while the resumed run reads: one line within bounded time, not an endless loop, and
  # the checkpoint it started from is still there.
  run = _Train(common + ['--config.train.steps=800'], fault_env, tmp_path / 'err2')
  run.wait_for_step(162)
  for path in corpus.iterdir():
    path.unlink()
  assert run.finish(timeout=240) == 2
  errors = [line for line in run.stderr.splitlines() if not line.startswith(('llm-jax: warning:', 'llm-jax: note:'))]
  assert len(errors) == 1 and errors[0].startswith('llm-jax: error: ') and 'documents in a row could not be used' \
      in errors[0] and 'no usable training data is left' in errors[0], run.stderr
  assert 160 in _committed(workdir)


# ---------------------------------------------------------------------------------------------------------
# A coordinator that never answers (multi-host start-up, llm_jax/distributed.py).


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path, fault_env):
  import socket
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  start = time.time()
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', 'train', f'--workdir={workdir}', f'--config={TINY}',
                        f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
                        '--distributed_timeout=2'], cwd=ROOT, env=fault_env, capture_output=True, text=True,
                       timeout=120)
  # Bounded: the 2 s timeout plus starting Python and importing jax, on a busy machine.
  assert time.time() - start < 60
  assert res.returncode == 2 and res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr, res.stderr
  assert res.stderr.startswith('llm-jax: error: ') and f'127.0.0.1:{port}' in res.stderr, res.stderr
  assert '--distributed_timeout' in res.stderr, res.stderr  # says which knob bounds the wait
  assert not workdir.exists()  # nothing written before the job is whole
