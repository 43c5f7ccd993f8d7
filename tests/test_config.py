"""Configs: recipes, overrides with types, one-line errors that name the key, JSON round trips."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, tiny_config
from llm_jax import cli, config as config_lib, recipes
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
  names = recipes.names()
  assert {'tiny', 'llama_1b', 'sft', 'dpo', 'bench/gpt2_124m', 'bench/llama_1b'} <= set(names)
  for name in names:
    cfg = config_lib.load(name + ':tiny')
    assert cfg.model.num_layers <= 4 and cfg.model.embed_dim <= 256, name


def test_a_recipe_is_named_the_new_way_or_the_old_way_or_by_its_file(tmp_path, monkeypatch):
  """`llama_1b:tiny`, the checkout's `configs/llama_1b.py:tiny` (no such file any more) and the shipped
  file's own path give the same config; a file of the user's wins over the old spelling, never over a bare
  shipped name."""
  monkeypatch.chdir(tmp_path)
  want = config_lib.load('llama_1b:tiny').to_dict()
  shipped_file = os.path.join(os.path.dirname(recipes.__file__), 'llama_1b.py')
  for spec in ('configs/llama_1b.py:tiny', './configs/llama_1b.py:tiny', 'llama_1b.py:tiny', shipped_file + ':tiny'):
    assert config_lib.load(spec).to_dict() == want, spec
  assert config_lib.load('configs/bench/llama_1b.py').to_dict() == config_lib.load('bench/llama_1b').to_dict()
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'llama_1b.py').write_text(
      'from llm_jax.config import load_recipe\n\n\ndef get_config(arg=None):\n'
      '  c = load_recipe("llama_1b:tiny")\n  c.train.steps = 7\n  return c\n')
  assert config_lib.load('configs/llama_1b.py').train.steps == 7  # the user's file, which loads a shipped one
  assert config_lib.load('llama_1b:tiny').train.steps == 20
  (tmp_path / 'tiny').write_text('not a recipe')  # a bare name is the shipped recipe whatever the directory holds
  assert config_lib.load('tiny:tiny').to_dict() == config_lib.load(os.path.join(
      os.path.dirname(recipes.__file__), 'tiny.py') + ':tiny').to_dict()


def test_a_shipped_recipe_copied_out_of_the_package_still_loads(tmp_path, monkeypatch):
  """sft.py takes its model from the `tiny` recipe by name, not by a path beside itself."""
  copy = tmp_path / 'my_sft.py'
  copy.write_text(open(os.path.join(os.path.dirname(recipes.__file__), 'sft.py')).read())
  monkeypatch.chdir(tmp_path)
  assert config_lib.load(f'{copy}:tiny').to_dict() == config_lib.load('sft:tiny').to_dict()


@pytest.mark.parametrize('spec,needle', [
    ('nope', "unknown recipe 'nope': no such file and no shipped recipe of that name (shipped: bert_base,"),
    ('configs/nope.py:tiny', 'config file not found: configs/nope.py (shipped recipes: bert_base,'),
    ('bench/nope', 'config file not found: bench/nope (shipped recipes: '),
])
def test_an_unknown_recipe_lists_the_shipped_ones(spec, needle, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError) as e:
    config_lib.load(spec)
  assert needle in str(e.value) and 'bench/llama_1b' in str(e.value) and 'llm-jax recipes' in str(e.value)


def test_recipes_lists_every_shipped_recipe_with_its_docstring_line(capsys):
  assert cli.main(['recipes']) == 0
  listing = capsys.readouterr().out
  for name in recipes.names():
    module = recipes.load_module(recipes.Recipe(name, shipped=True))
    first = module.__doc__.strip().splitlines()[0]
    assert len(first) > 20 and first[-1] == '.', (name, first)  # a sentence, not a line cut mid-way
    assert re.search(rf'^  {re.escape(name)} +{re.escape(first)}$', listing, flags=re.M), (name, listing)
  with pytest.raises(SystemExit) as e:  # --config=list: the same, without the command's required flags
    cli.main(['train', '--config=list'])
  assert e.value.code == 0 and capsys.readouterr().out == listing
  assert cli.main(['recipes', 'configs/llama_1b.py']) == 0
  shown = capsys.readouterr().out
  assert shown.startswith('llama_1b: ') and 'Variants: `llama_1b:tiny`' in shown


def test_version_is_the_installed_distributions(capsys):
  import importlib.metadata
  with pytest.raises(SystemExit) as e:
    cli.main(['--version'])
  assert e.value.code == 0
  assert capsys.readouterr().out.startswith(f'llm-jax {importlib.metadata.version("llm-jax")} (jax ')


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
