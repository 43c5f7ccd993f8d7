"""Checkpoints on disk: what orbax really leaves behind, the manifest that vouches for a step, falling back from
a damaged step, incomplete saves, failed saves that keep the previous checkpoint, and no pickle anywhere."""

import errno
import glob
import os
import pickle
import pickletools
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config

from llm_jax import sharding
from llm_jax.run import checkpoint_files
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory


@pytest.fixture(scope='module')
def factory():
  cfg = tiny_config()
  mesh = sharding.make_mesh(cfg.mesh)
  return StateFactory(build_model(cfg.model), optim.make_optimizer(cfg.train), mesh,
                      sharding.rules_from_config(cfg.mesh))


@pytest.fixture(scope='module')
def states(factory):
  """Three different states (seeds 1, 2, 3), saved as steps 1, 2, 3; one compiled initialiser for all."""
  init = jax.jit(factory._init, out_shardings=factory.shardings)
  return {s: init(jax.random.PRNGKey(s)) for s in (1, 2, 3)}


def _save(workdir, states, steps=(1, 2, 3), keep=3):
  ckpt = Checkpointer(str(workdir), keep=keep, async_save=False)
  for s in steps:
    ckpt.save(s, states[s], {'step': s}, {'note': 'test'})
  ckpt.close()
  return os.path.join(str(workdir), 'checkpoints')


def _same(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


def test_orbax_commits_by_renaming_and_the_manifest_is_inside_the_commit(tmp_path, states, monkeypatch):
  seen = {}
  real = checkpoint_files.write_manifest

  def spy(directory, step):
    seen['entries'] = sorted(os.listdir(directory))
    pending = os.path.join(directory, f'{step}{checkpoint_files.TMP_MARK}')
    seen['commit_file_yet'] = os.path.exists(os.path.join(pending, 'commit_success.txt'))
    real(directory, step)

  monkeypatch.setattr(checkpoint_files, 'write_manifest', spy)
  directory = _save(tmp_path, states, steps=(1,))
  # When our callback runs, orbax has written everything into N.orbax-checkpoint-tmp and not renamed it yet.
  assert seen['entries'] == [f'1{checkpoint_files.TMP_MARK}'] and not seen['commit_file_yet']
  assert sorted(os.listdir(directory)) == ['1']
  assert os.path.isfile(os.path.join(directory, '1', 'commit_success.txt'))
  assert checkpoint_files.check_step(directory, 1) == (True, None)

  # What orbax itself calls a step: any directory named N, complete or not; never N.orbax-checkpoint-tmp.
  shutil.copytree(os.path.join(directory, '1'), os.path.join(directory, f'2{checkpoint_files.TMP_MARK}'))
  os.makedirs(os.path.join(directory, '3'))
  ckpt = Checkpointer(str(tmp_path), create=False)
  assert ckpt.all_steps() == [1, 3]
  ckpt.close()


def test_incomplete_saves_are_removed_by_training_and_ignored_by_readers(tmp_path, states, capsys):
  directory = _save(tmp_path, states, steps=(1, 2))
  leftover = os.path.join(directory, f'3{checkpoint_files.TMP_MARK}')
  shutil.copytree(os.path.join(directory, '2'), leftover)

  reader = Checkpointer(str(tmp_path), create=False)
  assert reader.latest_step() == 2
  reader.close()
  assert os.path.isdir(leftover)
  assert f'ignoring incomplete checkpoint saves in {directory}: 3{checkpoint_files.TMP_MARK}' in \
      capsys.readouterr().err

  writer = Checkpointer(str(tmp_path))
  assert writer.latest_step() == 2
  writer.close()
  assert not os.path.exists(leftover)
  assert 'removing incomplete checkpoint saves' in capsys.readouterr().err


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)
  return size


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize('target', ['array', 'data_state', 'metadata'])
def test_a_truncated_file_in_the_newest_step_falls_back_to_the_previous_one(tmp_path, factory, states, capsys,
                                                                             target):
  directory = _save(tmp_path, states)
  step3 = os.path.join(directory, '3')
  path = {'array': _largest_array_file(step3), 'data_state': os.path.join(step3, 'data', 'metadata'),
          'metadata': os.path.join(step3, 'train', '_METADATA')}[target]
  size = _truncate(path)
  rel = os.path.relpath(path, step3)

  reader = Checkpointer(str(tmp_path), create=False)
  step, params = reader.restore_latest_params(factory.abstract_sharded().params)
  reader.close()
  assert step == 2
  _same(params, states[2].params)
  err = capsys.readouterr().err
  assert f'checkpoint step 3 in {directory} cannot be read ({rel} has {size // 2} bytes, {size} were ' \
         'written): using step 2 instead' in err
  assert os.path.isdir(step3)  # a reader changes nothing

  writer = Checkpointer(str(tmp_path))
  step, state, data_state = writer.restore_latest(factory.abstract_sharded())
  assert step == 2 and data_state == {'step': 2}
  _same(state, states[2])
  assert 'moved aside to checkpoints/3.damaged' in capsys.readouterr().err
  assert writer.all_steps() == [1, 2] and os.path.isdir(step3 + '.damaged')
  writer.save(3, states[3], {'step': 3}, {})  # training writes step 3 afresh
  writer.close()
  assert checkpoint_files.check_step(directory, 3) == (True, None)


def test_a_step_without_manifest_is_used_if_it_restores_and_passed_over_if_not(tmp_path, factory, states, capsys):
  directory = _save(tmp_path, states)
  for s in (2, 3):
    os.remove(os.path.join(directory, str(s), checkpoint_files.MANIFEST))
  _truncate(_largest_array_file(os.path.join(directory, '3')))
  ckpt = Checkpointer(str(tmp_path), create=False)
  step, params = ckpt.restore_latest_params(factory.abstract_sharded().params)
  ckpt.close()
  assert step == 2  # no manifest, but it restores: trusted (steps written before manifests existed)
  _same(params, states[2].params)
  warning = [line for line in capsys.readouterr().err.splitlines() if 'step 3' in line]
  assert len(warning) == 1 and 'cannot be read (' in warning[0] and 'using step 2 instead' in warning[0]
  assert len(warning[0]) < 500  # tensorstore's kilobytes of spec are cut


def test_a_params_only_step_is_sealed_and_read_as_params(tmp_path, factory, states, capsys):
  """Imported weights (`convert from-hf`) are a step of params alone: the training reader gives them back
  as params without data state, and a damaged one is passed over like any other step."""
  directory = _save(tmp_path, states, steps=(1,))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save_params(2, states[2].params, {'note': 'imported'})
  ckpt.close()
  assert checkpoint_files.check_step(directory, 2) == (True, None)  # a manifest vouches for it
  reader = Checkpointer(str(tmp_path), create=False)
  step, params, data_state = reader.restore_latest(factory.abstract_sharded())
  reader.close()
  assert step == 2 and data_state is None
  _same(params, states[2].params)
  _truncate(_largest_array_file(os.path.join(directory, '2')))
  writer = Checkpointer(str(tmp_path))
  step, state, data_state = writer.restore_latest(factory.abstract_sharded())
  writer.close()
  assert step == 1 and data_state == {'step': 1}
  _same(state.params, states[1].params)
  assert 'checkpoint step 2' in capsys.readouterr().err and sorted(os.listdir(directory)) == ['1', '2.damaged']


def test_when_no_step_reads_it_is_an_error_and_nothing_is_moved(tmp_path, factory, states):
  directory = _save(tmp_path, states, steps=(1, 2))
  for s in (1, 2):
    _truncate(os.path.join(directory, str(s), 'train', '_METADATA'))
  ckpt = Checkpointer(str(tmp_path))
  with pytest.raises(UserError, match=r'no checkpoint in .* can be read \(step 2: train/_METADATA has .*; '
                                      r'step 1: train/_METADATA has .*\); move them away to start over'):
    ckpt.restore_latest(factory.abstract_sharded())
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['1', '2']


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS])
def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, factory, states, monkeypatch, code):
  directory = _save(tmp_path, states, steps=(1,), keep=1)

  def full(directory, step):  # runs in orbax's background thread, as a failing write would
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(checkpoint_files, 'write_manifest', full)
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(2, states[2], {'step': 2}, {})  # asynchronous: the failure surfaces at the next wait
  with pytest.raises(UserError) as err:
    ckpt.wait()
  ckpt.close()
  assert str(err.value) == (f'cannot write the checkpoint of step 2 to {directory}: {os.strerror(code)}; '
                            'the newest complete checkpoint, step 1, is intact')
  assert os.listdir(directory) == ['1']  # the partial step 2 is gone, step 1 (max_to_keep=1) is not
  monkeypatch.undo()
  reader = Checkpointer(str(tmp_path), create=False)
  step, params = reader.restore_latest_params(factory.abstract_sharded().params)
  reader.close()
  assert step == 1
  _same(params, states[1].params)


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path, states, monkeypatch):
  def broken(directory, step):
    raise KeyError('not an I/O problem')

  monkeypatch.setattr(checkpoint_files, 'write_manifest', broken)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(KeyError):
    ckpt.save(1, states[1], {}, {})
  monkeypatch.undo()
  ckpt.close()


def test_too_little_space_for_one_checkpoint_is_an_error_before_training(tmp_path, factory, monkeypatch):
  ckpt = Checkpointer(str(tmp_path))
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
  with pytest.raises(UserError, match=r'has 0.0 MiB free; one checkpoint of this run needs about [\d.]+ MiB'):
    ckpt.check_space(factory.abstract_sharded())
  ckpt.close()



def test_a_save_that_cannot_fit_is_refused_before_orbax_writes_anything(tmp_path, factory, states, monkeypatch):
  directory = _save(tmp_path, states, steps=(1,))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  before = sorted(os.listdir(directory))
  need = sum(x.nbytes for x in jax.tree.leaves((states[2].params, states[2].opt_state)))
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - need + 1,
                                                                                  need - 1))
  with pytest.raises(UserError) as err:
    ckpt.save(2, states[2], {'step': 2}, {})
  assert str(err.value).startswith(f'cannot write the checkpoint of step 2 to {directory}: No space left on '
                                   'device (') and str(err.value).endswith('the newest complete checkpoint, step '
                                                                           '1, is intact')
  assert sorted(os.listdir(directory)) == before  # not even a temporary directory was started
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - need, need))
  ckpt.save(2, states[2], {'step': 2}, {})  # exactly enough is enough
  ckpt.close()
  assert ckpt.all_steps() == [1, 2]

def test_an_unwritable_checkpoint_directory_is_an_error_at_start(tmp_path):
  (tmp_path / 'checkpoints').write_text('a file where the directory should be')
  with pytest.raises(UserError, match=r'cannot write checkpoints to .*checkpoints: '):
    Checkpointer(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# No pickle: a workdir holds JSON, protobuf (the tokenizer), event files and tensorstore arrays.


def _pickles(root):
  """Files under root that are pickles (a .pkl/.pickle name, or protocol 2+ bytes that parse as one)."""
  found = []
  for path in glob.glob(os.path.join(root, '**', '*'), recursive=True):
    if not os.path.isfile(path):
      continue
    if path.endswith(('.pkl', '.pickle')):
      found.append(path)
      continue
    with open(path, 'rb') as f:
      data = f.read()
    if len(data) >= 3 and data[0] == 0x80 and 2 <= data[1] <= 5:
      try:
        ops = list(pickletools.genops(data))
      except Exception:
        continue
      if ops and ops[-1][0].name == 'STOP':
        found.append(path)
  return found


def test_the_pickle_detector_detects_pickles(tmp_path):
  (tmp_path / 'a.bin').write_bytes(pickle.dumps({'x': [1, 2]}, protocol=4))
  (tmp_path / 'b.json').write_text('{"x": 1}')
  assert _pickles(str(tmp_path)) == [str(tmp_path / 'a.bin')]


def test_a_trained_workdir_holds_no_pickle_and_loading_it_never_unpickles(tmp_path, tokenizer_path, monkeypatch):
  from llm_jax.infer import inference
  from llm_jax.run import workdir as workdir_lib
  from llm_jax.train import loop
  cfg = tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '3'), ('train.checkpoint_every', '2'),
                    ('eval.every', '0'), ('train.log_every', '1'))
  workdir = str(tmp_path / 'run')
  loop.train(cfg, workdir)
  assert _pickles(workdir) == []
  assert len(glob.glob(os.path.join(workdir, 'checkpoints', '*', checkpoint_files.MANIFEST))) == 2

  def refuse(*args, **kwargs):
    raise AssertionError('pickle used while loading a run')

  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  workdir_lib.load_config(workdir)
  run = inference.load_run(workdir)
  assert run.step == 3
  ckpt = Checkpointer(workdir, create=False)
  step, _, data_state = ckpt.restore_latest(StateFactory(run.model, optim.make_optimizer(run.cfg.train), run.mesh,
                                                         run.rules).abstract_sharded())
  ckpt.close()
  assert step == 3 and data_state['format'].startswith('llm-jax-data/')


def test_bench_checkpoint_smoke(capsys):
  import importlib.util
  import json
  from conftest import ROOT, TINY
  spec = importlib.util.spec_from_file_location('bench_checkpoint', os.path.join(ROOT, 'tools', 'bench_checkpoint.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.main([f'--config={TINY}', '--saves=2']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
  assert lines[0]['state_bytes'] > 0 and [r['save'] for r in lines[1:3]] == [1, 2]
  assert all(r['manifest_s'] >= 0 and r['bytes'] > 0 for r in lines[1:3]) and lines[3]['restore_latest'] == 2
