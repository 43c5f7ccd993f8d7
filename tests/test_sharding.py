"""The same loss on one device and on an 8-device (data 2 x fsdp 2 x tensor 2) mesh; parameters really sharded."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory
from llm_jax.train.step import make_eval_step, make_train_step


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(4, cfg.model.vocab_size, size=(B, T + 1), dtype=np.int32)
  segments = np.ones((B, T), np.int32)
  segments[:, T // 2:] = 2  # two documents per row
  positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((B, T), np.int32),
          'segment_ids': segments, 'positions': positions}


def _one_step(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  state = factory.init(cfg.seed)
  batch_sh = sharding.batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, batch_sh) for k, v in _batch(cfg).items()}
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh)
  state, metrics = step(state, batch)
  eval_step = make_eval_step(model, mesh, rules, factory.param_shardings, batch_sh)
  after = eval_step(state.params, batch)
  return jax.device_get(metrics), jax.device_get(after), jax.device_get(state.params), state


def test_loss_on_8_device_mesh_equals_one_device():
  assert len(jax.devices()) == 8, 'conftest sets 8 fake CPU devices'
  one = tiny_config(('mesh.data', '1'))
  eight = tiny_config(('mesh.data', '2'), ('mesh.fsdp', '2'), ('mesh.tensor', '2'))
  m1, e1, p1, _ = _one_step(one, jax.devices()[:1])
  m8, e8, p8, state8 = _one_step(eight, jax.devices())
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-4)
  np.testing.assert_allclose(e8['nll_sum'], e1['nll_sum'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # The 8-device run really was sharded: the MLP kernels are split over fsdp and tensor.
  gate = state8.params['layers']['mlp']['gate']
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  assert gate.addressable_shards[0].data.shape == (gate.shape[0], gate.shape[1] // 2, gate.shape[2] // 2)


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
  with pytest.raises(UserError, match='needs 12 devices, 8 are present'):
    sharding.make_mesh(tiny_config(('mesh.data', '3'), ('mesh.fsdp', '2'), ('mesh.tensor', '2')).mesh)
  with pytest.raises(UserError, match='cannot fill 8 devices'):
    sharding.make_mesh(tiny_config(('mesh.tensor', '3')).mesh)


def test_logical_rules_give_batch_priority_over_embed():
  rules = sharding.rules_from_config(tiny_config().mesh.rules)
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(('batch', 'seq', 'embed'), rules) == P(('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
