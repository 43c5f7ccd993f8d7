"""The jitted train step: gradient accumulation equals one big batch; metrics; non-finite updates skipped."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.loss import LossConfig
from llm_jax.train.state import StateFactory
from llm_jax.train.step import make_train_step


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(4, cfg.model.vocab_size, size=(B, T + 1), dtype=np.int32)
  mask = (rng.random((B, T)) > 0.2).astype(np.int32)  # uneven token counts per row and microbatch
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def _run(cfg, steps=2, poison_at=None):
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  state = factory.init(cfg.seed)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh,
                         loss_cfg=LossConfig.from_config(cfg.train), microbatches=cfg.train.microbatches)
  history = []
  for i in range(steps):
    batch = _batch(cfg, i)
    if poison_at is not None:  # a float mask in every step, so that one compiled step serves them all
      batch['loss_mask'] = batch['loss_mask'].astype(np.float32)
    if i == poison_at:
      # An infinite loss mask makes the loss and every gradient non-finite, as a diverged run would.
      batch['loss_mask'] = np.full(batch['loss_mask'].shape, np.inf, np.float32)
    state, metrics = step(state, {k: jax.device_put(v, batch_sh) for k, v in batch.items()})
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params), state


def test_microbatches_give_the_update_of_one_big_batch():
  # On a data 2 x fsdp 2 x tensor 2 mesh: each microbatch of 8 rows is itself spread over the batch shards.
  base = (('data.batch_size', '32'), ('mesh.data', '2'), ('mesh.fsdp', '2'), ('mesh.tensor', '2'),
          ('train.z_loss', '1e-3'), ('train.label_smoothing', '0.1'))
  one, params_one, _ = _run(tiny_config(*base))
  four, params_four, _ = _run(tiny_config(*base, ('train.microbatches', '4')))
  # (Not vacuous: accumulating wrongly, e.g. one microbatch's gradient or a mean of means over uneven
  # token counts, changes these numbers.)
  for a, b in zip(one, four):
    for key in ('loss', 'z_loss', 'grad_norm', 'param_norm', 'tokens'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_four)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
  m = one[0]  # the documented metrics, and nothing else
  assert set(m) == {'loss', 'z_loss', 'grad_norm', 'param_norm', 'learning_rate', 'tokens', 'finite'}
  assert 0 < m['loss'] < 10 and m['z_loss'] > 0 and m['param_norm'] > 0 and bool(m['finite'])


def test_a_poisoned_step_is_skipped_and_counted_when_asked():
  cfg = tiny_config(('train.skip_nonfinite', 'true'), ('train.warmup_steps', '0'))
  history, params, _ = _run(cfg, steps=3, poison_at=1)
  assert [bool(m['finite']) for m in history] == [True, False, True]
  assert [int(m['skipped']) for m in history] == [0, 1, 1]
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
  # Without skipping, the same poison reaches the parameters.
  _, bad, _ = _run(tiny_config(('train.warmup_steps', '0')), steps=2, poison_at=1)
  assert not all(np.all(np.isfinite(p)) for p in jax.tree.leaves(bad))


@pytest.mark.parametrize('key,value,needle', [
    ('train.optimizer', 'sgd', 'train.optimizer'),
    ('train.schedule', 'step', 'train.schedule'),
    ('train.decay_fraction', '0', 'train.decay_fraction'),
    ('train.opt_state_dtype', 'float16', 'train.opt_state_dtype'),
    ('train.microbatches', '3', r'train.microbatches=3: expected a divisor of data.batch_size=8'),
    ('train.loss_chunk', '7', r'train.loss_chunk=7: expected 0 \(off\) or a divisor of data.seq_len=64'),
    ('train.label_smoothing', '1', 'train.label_smoothing'),
    ('train.z_loss', '-1', 'train.z_loss'),
    ('train.profile_steps', '5,2', r'train.profile_steps=\(5, 2\)'),
    ('model.logits_dtype', 'int8', 'model.logits_dtype'),
    ('model.dtype', 'fp8', 'model.dtype'),
    ('model.remat', 'some', 'model.remat'),
])
def test_training_keys_are_checked_naming_the_key(key, value, needle):
  with pytest.raises(UserError, match=needle):
    tiny_config((key, value))
