"""Configs: recipes, overrides with types, one-line errors that name the key, JSON round trips."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, tiny_config
from llm_jax import config as config_lib
from llm_jax.errors import UserError


def test_overrides_are_parsed_to_the_type_of_the_key():
  cfg = tiny_config(('train.steps', '7'), ('train.learning_rate', '1e-4'), ('model.tie_embeddings', 'true'),
                    ('data.source', 'x/*.txt'), ('mesh.rules', "(('batch', 'data'),)"))
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.train.learning_rate == 1e-4
  assert cfg.model.tie_embeddings is True
  assert cfg.data.source == 'x/*.txt'
  assert cfg.mesh.rules == (('batch', 'data'),)
  with pytest.raises(AttributeError):  # locked: a typo in code fails loudly too
    cfg.train.stepz = 3


@pytest.mark.parametrize('key,value,needle', [
    ('train.stepz', '3', 'unknown config key train.stepz'),
    ('nosuch.section', '3', 'unknown config key nosuch.section'),
    ('train.steps', 'many', 'config key train.steps expects an integer'),
    ('model.tie_embeddings', 'maybe', 'config key model.tie_embeddings expects a boolean'),
    ('train.learning_rate', 'fast', 'config key train.learning_rate expects a number'),
    ('model.num_kv_heads', '3', 'model.num_kv_heads=3'),
    ('model.dtype', 'float8', 'model.dtype'),
    ('train', '3', 'config key train is a section'),
    ('mesh.rules', "(('batch', 'pod'),)", "mesh axis 'pod'"),
])
def test_bad_overrides_name_the_key(key, value, needle):
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    tiny_config((key, value))


def test_every_recipe_has_a_tiny_variant_that_validates():
  recipes = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True))
  assert recipes
  for path in recipes:
    cfg = config_lib.load(path + ':tiny')
    assert cfg.model.num_layers <= 4 and cfg.model.embed_dim <= 256, path


def test_json_round_trip_is_exact(tmp_path):
  cfg = tiny_config(('train.steps', '11'))
  path = str(tmp_path / 'config.json')
  config_lib.write_json_atomic(cfg, path)
  again = config_lib.from_json_file(path)
  assert again.to_dict() == cfg.to_dict()


def test_saved_config_with_unknown_key_is_refused(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('{"train": {"stepz": 3}}')
  with pytest.raises(UserError, match='unknown config key train.stepz'):
    config_lib.from_json_file(str(path))


def _cli(*args, cwd=None):
  env = dict(os.environ, PYTHONWARNINGS='ignore')
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True,
                        cwd=cwd or ROOT, env=env, timeout=300)


@pytest.mark.parametrize('flags,needle', [
    (['--config.train.stepz=5'], 'unknown config key train.stepz'),
    (['--config.train.steps=five'], 'config key train.steps expects an integer'),
    (['--config=configs/nope.py'], 'config file not found: configs/nope.py'),
    (['--bogus=1'], 'unknown flag --bogus=1'),
])
def test_cli_config_errors_are_one_line_without_traceback(tmp_path, flags, needle):
  workdir = tmp_path / 'run'
  res = _cli('train', f'--workdir={workdir}', f'--config={TINY}', *flags)
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], res.stderr
  assert 'Traceback' not in res.stderr
  assert not workdir.exists()  # nothing written for a run that never started
