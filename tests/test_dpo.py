"""DPO: preference pairs raise the chosen-minus-rejected margin over the frozen reference, the reference
stays as it was, and bad records or a missing reference are refused clearly."""

import json
import os

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.run import finetune, params as params_lib
from llm_jax.infer import inference
from llm_jax.data import chat, pipeline, sources
from llm_jax.data.files import Record, Skipped
from llm_jax.errors import UserError
from llm_jax.train import loop
from llm_jax.train.dpo import DPO_METRICS, pair_logps
from llm_jax.train.state import param_shardings

DPO = 'dpo'


@pytest.fixture(scope='module')
def prefs(tmp_path_factory):
  path = tmp_path_factory.mktemp('dpo') / 'prefs.jsonl'
  with open(path, 'w') as f:
    for i in range(8):
      f.write(json.dumps({'prompt': f'Count to {i}.', 'chosen': ' '.join(str(j) for j in range(i + 1)),
                          'rejected': 'I will not.'}) + '\n')
    f.write(json.dumps({'prompt': 'Count to 9.', 'chosen': '0 1 2'}) + '\n')  # skipped: no 'rejected'
  return str(path)


def _params(workdir):
  return jax.device_get(inference.load_run(workdir).params)


def test_dpo_raises_the_margin_on_the_pairs_and_leaves_the_reference(pretrained_workdir, prefs, tmp_path):
  reference_before = _params(pretrained_workdir)
  cfg = config_lib.load(DPO + ':tiny', [('init_from', pretrained_workdir), ('data.source', prefs),
                                        ('train.log_every', '5')])
  workdir = str(tmp_path / 'dpo')
  loop.train(cfg, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert all(set(DPO_METRICS) <= set(r) for r in records)
  assert records[-1]['reward_accuracy'] > 0.9 and records[-1]['margin'] > records[0]['margin'] + 0.5
  assert records[-1]['chosen_reward'] > 0 > records[-1]['rejected_reward']

  # Independently of the logged metrics: every training pair, policy against reference.
  run = inference.load_run(workdir)
  ref = params_lib.from_init(run.cfg, run.mesh, run.rules,
                             param_shardings(run.model, run.mesh, run.rules))[0]
  docs = sources.open_source(run.cfg.data, 'train')
  logps = jax.jit(lambda p, b: pair_logps(run.model, p, b))
  margins = {'policy': [], 'reference': []}
  for batch in pipeline.eval_batches(docs, run.tokenizer, run.cfg.data, batch_size=8, model_cfg=run.cfg.model):
    for name, params in (('policy', run.params), ('reference', ref)):
      chosen, rejected, valid = (np.asarray(x) for x in logps(params, batch))
      margins[name].extend((chosen - rejected)[valid])
  policy, reference = np.array(margins['policy']), np.array(margins['reference'])
  assert len(policy) == 8
  assert np.mean(policy > reference) > 0.9

  reference_after = _params(pretrained_workdir)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reference_before),
                                                  jax.tree.leaves(reference_after)))


def test_pairs_share_a_segment_in_both_streams(tokenizer):
  from llm_jax.data.packing import Packer, empty_batch
  dpo = chat.DPO(chat.Template(tokenizer, ('system', 'user', 'assistant'), True), seq_len=64)
  records = [Record(f'p.jsonl:{i}', {'prompt': 'q' * (i + 1), 'chosen': 'yes ' * (i + 1), 'rejected': 'no'})
             for i in range(6)]
  packer = Packer(dpo.streams(64), lambda start: (dpo.from_record(r) for r in records[start:]))
  out = empty_batch(dpo.streams(64), 2)
  packer.fill(out, 0)
  segs = set(out['segment_ids'][0].tolist()) - {0}
  assert segs and segs == set(out['rejected_segment_ids'][0].tolist()) - {0}
  for s in segs:  # each segment of the chosen row trains on its chosen reply, of the rejected row on 'no'
    rejected = out['rejected_targets'][0][(out['rejected_segment_ids'][0] == s) & (out['rejected_loss_mask'][0] == 1)]
    assert rejected.tolist() == tokenizer.encode('no') + [dpo.template.end_id]


@pytest.mark.parametrize('fields,needle', [
    ({'prompt': 'q', 'chosen': 'a'}, "field 'rejected' is missing"),
    ({'prompt': 'q', 'chosen': '', 'rejected': 'b'}, "'chosen' or 'rejected' is empty"),
    ({'chosen': 'a', 'rejected': 'b'}, "field 'prompt' is missing"),
])
def test_bad_pairs_are_skipped_with_file_and_line(tokenizer, fields, needle):
  dpo = chat.DPO(chat.Template(tokenizer, ('user', 'assistant'), True), seq_len=64)
  out = dpo.from_record(Record('prefs.jsonl:3', fields))
  assert isinstance(out, Skipped) and out.message().startswith('prefs.jsonl:3: ') and needle in out.message()


def test_dpo_needs_a_reference(prefs):
  cfg = config_lib.load(DPO + ':tiny', [('data.source', prefs)])
  with pytest.raises(UserError, match="data.objective='dpo' needs a pretrained workdir"):
    finetune.resolve(cfg)
  with pytest.raises(UserError, match='train.microbatches=2: expected 1 for data.objective'):
    config_lib.load(DPO + ':tiny', [('train.microbatches', '2')])


def test_dpo_refuses_dropout(prefs):
  """The implicit reward compares the policy with the reference on the same pair: dropout on one of them
  (the step never passed a dropout rng, so it failed with a traceback) is refused up front instead."""
  with pytest.raises(UserError, match=r"model.dropout_rate=0.1: expected 0 for data.objective='dpo'"):
    config_lib.load(DPO + ':tiny', [('data.source', prefs), ('model.dropout_rate', '0.1')])


def test_a_lora_dpo_step_differentiates_the_adapters_alone():
  from conftest import tiny_config
  from llm_jax import sharding
  from llm_jax.run import lora
  from llm_jax.train.dpo import dpo_loss, make_dpo_step
  from llm_jax.train.optim import global_norm
  from llm_jax.train.step import setup_train_step
  cfg = tiny_config(('data.objective', 'dpo'), ('model.lora.rank', '2'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  setup = setup_train_step(cfg, mesh, rules)
  state = setup.factory.init(0)
  ref = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  batch = {}
  for prefix in ('', 'rejected_'):
    tokens = rng.integers(3, cfg.model.vocab_size, (8, 65)).astype(np.int32)
    batch.update({f'{prefix}inputs': tokens[:, :-1], f'{prefix}targets': tokens[:, 1:],
                  f'{prefix}loss_mask': np.tile((np.arange(64) >= 32).astype(np.int32), (8, 1)),
                  f'{prefix}segment_ids': np.ones((8, 64), np.int32),
                  f'{prefix}positions': np.tile(np.arange(64, dtype=np.int32), (8, 1))})
  batch = pipeline.to_global(batch, setup.batch_sharding)
  base, adapters = lora.split(ref)
  beta = cfg.data.dpo_beta
  want = global_norm(jax.grad(lambda a: dpo_loss(setup.model, lora.merge(base, a), ref, batch, beta)[0])(adapters))
  step = make_dpo_step(setup.model, setup.tx, setup.lr_schedule, mesh, rules, setup.factory.shardings,
                       setup.batch_sharding, beta)
  state, metrics = step(state, batch, ref)
  np.testing.assert_allclose(float(metrics['grad_norm']), float(want), rtol=1e-4)
  after_base = lora.split(jax.device_get(state.params))[0]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(after_base)))
