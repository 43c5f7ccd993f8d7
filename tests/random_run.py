"""Runs with random params for decoding, serving and evaluation tests: no training step to compile."""

import os
import shutil

import jax

from conftest import tiny_config

from llm_jax import config as config_lib, sharding
from llm_jax.infer import inference
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory


def _factory(cfg, devices=None):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  return StateFactory(model, optim.make_optimizer(cfg.train), mesh, rules), mesh, rules, model


def make_run(tokenizer_path: str, *overrides, devices=None) -> inference.Run:
  """An in-memory Run (what inference.load_run returns) with params from the config's seed, on a mesh of
  `devices` (all of them by default)."""
  cfg = tiny_config(('data.tokenizer', tokenizer_path), *overrides)
  factory, mesh, rules, model = _factory(cfg, devices)
  params = jax.jit(lambda: factory._init(jax.random.PRNGKey(cfg.seed)).params,
                   out_shardings=factory.param_shardings)()
  return inference.Run(cfg, tokenizer_lib.load(tokenizer_path), model, params, mesh, rules, step=0)


def write_workdir(workdir: str, tokenizer_path: str, *overrides) -> str:
  """A workdir as training leaves it (config, tokenizer, one checkpoint), holding the initial state."""
  cfg = tiny_config(('data.tokenizer', tokenizer_path), *overrides)
  os.makedirs(workdir, exist_ok=True)
  config_lib.write_json_atomic(cfg, workdir_lib.config_path(workdir))
  shutil.copyfile(tokenizer_path, os.path.join(workdir, workdir_lib.TOKENIZER))
  factory, *_ = _factory(cfg)
  ckpt = Checkpointer(workdir, async_save=False)
  ckpt.save(1, factory.init(cfg.seed), {}, cfg.to_dict())
  ckpt.close()
  return workdir


def write_encoder_workdir(workdir: str, tokenizer_path: str, *overrides) -> str:
  """An encoder run (configs/bert_base.py:tiny) holding its initial state: an embedder for retrieval tests."""
  from conftest import recipe_config
  cfg = recipe_config('bert_base', ('data.tokenizer', tokenizer_path), *overrides)
  os.makedirs(workdir, exist_ok=True)
  config_lib.write_json_atomic(cfg, workdir_lib.config_path(workdir))
  shutil.copyfile(tokenizer_path, os.path.join(workdir, workdir_lib.TOKENIZER))
  factory, *_ = _factory(cfg)
  ckpt = Checkpointer(workdir, async_save=False)
  ckpt.save(1, factory.init(cfg.seed), {}, cfg.to_dict())
  ckpt.close()
  return workdir
