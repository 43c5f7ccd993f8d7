"""LoRA: only the adapters train and are checkpointed, the optimizer state scales with the rank, and the
merged export computes the same logits as the adapters applied."""

import json
import os

import jax
import numpy as np
import pytest

from llm_jax import cli, config as config_lib, sharding
from llm_jax.run import finetune, lora, params as params_lib
from llm_jax.infer import inference
from llm_jax.run.checkpoint import checkpoint_dir
from llm_jax.data import pipeline, tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.models import build_model, example_batch
from llm_jax.train import loop, optim
from llm_jax.train.state import StateFactory
from llm_jax.models.outputs import forward
from llm_jax.train.optim import global_norm
from llm_jax.train.step import loss_and_stats, make_train_step

SFT = 'sft'


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  path = tmp_path_factory.mktemp('lora') / 'pairs.jsonl'
  with open(path, 'w') as f:
    for i in range(8):
      f.write(json.dumps({'prompt': f'Count to {i}.', 'response': ' '.join(str(j) for j in range(i + 1))}) + '\n')
  return str(path)


def lora_config(pretrained, source, rank=4, *overrides):
  return finetune.resolve(config_lib.load(SFT + ':tiny,lora', [
      ('init_from', pretrained), ('data.source', source), ('model.lora.rank', str(rank)), *overrides]))


def _sizes(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_only_the_adapters_change(pretrained_workdir, source):
  cfg = lora_config(pretrained_workdir, source, 4, ('model.lora.targets', "('q', 'o', 'up')"),
                   ('train.warmup_steps', '0'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  tx = lora.optimizer(optim.make_optimizer(cfg.train))
  factory = StateFactory(model, tx, mesh, rules)
  state = finetune.initial_state(cfg, factory, mesh, rules)
  before = jax.device_get(state.params)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sharding)
  stream = pipeline.TrainStream(cfg.data, tokenizer_lib.load(cfg.data.tokenizer), seed=0, model_cfg=cfg.model)
  norms = []
  for _ in range(2):  # B starts at zero, so A moves from the second step on
    batch = pipeline.to_global(next(stream), batch_sharding)
    base, adapters = lora.split(state.params)
    grads = jax.grad(lambda a, b=batch, base=base: loss_and_stats(model, lora.merge(base, a), b)[0])(adapters)
    whole = jax.grad(lambda p, b=batch: loss_and_stats(model, p, b)[0])(state.params)
    norms.append((float(global_norm(grads)), float(global_norm(whole))))
    state, metrics = step(state, batch)
    # grad_norm is the adapters' (what clipping sees), not the whole model's: only they are differentiated
    np.testing.assert_allclose(float(metrics['grad_norm']), norms[-1][0], rtol=1e-4)
  assert norms[-1][1] > 1.5 * norms[-1][0]  # the check above can tell the two apart
  stream.close()
  after = jax.device_get(state.params)
  base_before, adapters_before = lora.split(before)
  base_after, adapters_after = lora.split(after)
  names = {k[-1] for k in jax.tree_util.tree_flatten_with_path(adapters_after)[0] for k in [tuple(
      getattr(p, 'key', p) for p in k[0])]}
  assert names == {f'{t}_lora_{ab}' for t in ('q', 'o', 'up') for ab in 'ab'}
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)))
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_before),
                                                      jax.tree.leaves(adapters_after)))


def test_optimizer_state_scales_with_the_rank_not_the_model(pretrained_workdir, source):
  mesh = sharding.make_mesh(config_lib.default_config().mesh)
  sizes = {}
  for rank in (2, 4, 8):
    cfg = lora_config(pretrained_workdir, source, rank)
    factory = StateFactory(build_model(cfg.model), lora.optimizer(optim.make_optimizer(cfg.train)), mesh,
                           sharding.rules_from_config(cfg.mesh))
    adapters = _sizes(lora.split(factory.abstract.params)[1])
    sizes[rank] = (_sizes(factory.abstract.opt_state), adapters, _sizes(factory.abstract.params))
  for rank, (opt, adapters, params) in sizes.items():
    assert adapters * 2 == sizes[2][1] * rank  # adapters grow linearly with the rank ...
    assert 2 * adapters <= opt <= 2 * adapters + 8  # ... AdamW's two moments of them, plus a few counters
    assert opt < params / 4
  assert sizes[8][1] == 4 * sizes[2][1]


@pytest.mark.slow
def test_checkpoints_hold_adapters_resume_and_merge_to_the_same_logits(pretrained_workdir, source, tmp_path,
                                                                         capsys):
  cfg = config_lib.load(SFT + ':tiny,lora', [('init_from', pretrained_workdir), ('data.source', source),
                                              ('train.steps', '6'), ('train.checkpoint_every', '3')])
  workdir = str(tmp_path / 'lora')
  loop.train(cfg, workdir, stop_at=3)
  loop.train(cfg, workdir)  # resumes: adapters from the checkpoint, base from init_from
  params_dir = os.path.join(checkpoint_dir(workdir), '6', 'params')
  saved = json.load(open(os.path.join(params_dir, '_METADATA')))['tree_metadata']
  assert saved and all('_lora_' in key for key in saved)
  out = str(tmp_path / 'merged')
  assert cli.main(['export', '--merge-lora', f'--workdir={workdir}', f'--output={out}']) == 0
  adapted, merged = inference.load_run(workdir), inference.load_run(out)
  assert merged.cfg.model.lora.rank == 0 and not merged.cfg.init_from and merged.step == 6
  assert not lora.split(merged.params)[1]
  batch = example_batch(adapted.cfg.model, rows=2, length=16)
  batch['inputs'] = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % adapted.cfg.model.vocab_size
  run_adapted = jax.jit(lambda p, b: forward(adapted.model, p, b))
  run_plain = jax.jit(lambda p, b: forward(merged.model, p, b))
  logits_adapted = np.asarray(run_adapted(adapted.params, batch))
  logits_merged = np.asarray(run_plain(merged.params, batch))
  logits_base = np.asarray(run_plain(lora.split(adapted.params)[0], batch))
  np.testing.assert_allclose(logits_merged, logits_adapted, atol=2e-5)
  assert np.abs(logits_adapted - logits_base).max() > 1e-3  # the adapters did something to merge

  # Every reader of a run reads a LoRA run the same way (run/params.py): `convert to-hf` exports the merged
  # weights (it used to call the adapters-only checkpoint unreadable), and init_from starts from them.
  from safetensors.numpy import load_file
  for name, run_dir in (('hf_lora', workdir), ('hf_merged', out)):
    assert cli.main(['convert', 'to-hf', f'--workdir={run_dir}', f'--output={tmp_path / name}']) == 0
  from_lora = load_file(str(tmp_path / 'hf_lora' / 'model.safetensors'))
  from_merged = load_file(str(tmp_path / 'hf_merged' / 'model.safetensors'))
  assert from_lora.keys() == from_merged.keys() and not [k for k in from_lora if 'lora' in k]
  for key in from_lora:
    np.testing.assert_array_equal(from_lora[key], from_merged[key])
  child = finetune.resolve(config_lib.load(SFT + ':tiny', [('init_from', workdir), ('data.source', source)]))
  shardings = jax.tree.map(lambda a: a.sharding, merged.params)
  start, step = params_lib.from_init(child, merged.mesh, merged.rules, shardings)
  assert step == 6
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(merged.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_refuses_bad_input(pretrained_workdir, tmp_path, capsys):
  def run(*args):
    code = cli.main(['export', *args])
    return code, capsys.readouterr().err
  code, err = run(f'--workdir={pretrained_workdir}', f'--output={tmp_path}/x')
  assert code == 2 and 'give --merge-lora' in err
  code, err = run('--merge-lora', f'--workdir={pretrained_workdir}', f'--output={tmp_path}/x')
  assert code == 2 and 'has no LoRA adapters' in err
  code, err = run('--merge-lora', f'--workdir={tmp_path}/nope', f'--output={tmp_path}/x')
  assert code == 2 and 'does not exist' in err and err.count('\n') == 1


def test_lora_needs_init_from(source):
  cfg = config_lib.load(SFT + ':tiny,lora', [('data.source', source)])
  with pytest.raises(UserError, match="config key init_from='' : model.lora.rank > 0 needs a pretrained"):
    finetune.resolve(cfg)


def test_a_lora_step_with_dropout_applies_it_and_trains_the_adapters_alone():
  from conftest import tiny_config
  from llm_jax.train.step import setup_train_step
  cfg = tiny_config(('model.lora.rank', '2'), ('model.dropout_rate', '0.3'), ('train.warmup_steps', '0'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  setup = setup_train_step(cfg, mesh, rules)
  state = setup.factory.init(0)
  before = jax.device_get(state.params)
  tokens = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (8, 65)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((8, 64), np.int32),
           'segment_ids': np.ones((8, 64), np.int32), 'positions': np.tile(np.arange(64, dtype=np.int32), (8, 1))}
  batch = pipeline.to_global(batch, setup.batch_sharding)
  deterministic = float(loss_and_stats(build_model(cfg.model), state.params, batch)[0])
  state, metrics = setup.step(state, batch)
  assert bool(metrics['finite']) and abs(float(metrics['loss']) - deterministic) > 1e-3  # dropout was applied
  base_before, adapters_before = lora.split(before)
  base_after, adapters_after = lora.split(jax.device_get(state.params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_before),
                                                      jax.tree.leaves(adapters_after)))
