"""Optimizers, schedules, the weight-decay mask, optimizer-state dtype and sharding, skipping bad updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory, init_params


def _lr(schedule, **over):
  cfg = tiny_config(('train.schedule', schedule), ('train.steps', '100'), ('train.warmup_steps', '10'),
                    ('train.learning_rate', '1.0'), ('train.min_lr_ratio', '0.1'),
                    *[(f'train.{k}', str(v)) for k, v in over.items()])
  fn = optim.schedule(cfg.train)
  return np.array([float(fn(s)) for s in range(101)])


@pytest.mark.parametrize('name', ['cosine', 'linear', 'constant', 'rsqrt', 'wsd'])
def test_schedules_warm_up_linearly_then_never_rise(name):
  lr = _lr(name)
  np.testing.assert_allclose(lr[:11], np.arange(11) / 10, atol=1e-6)  # warmup: 0 -> peak
  assert np.all(np.diff(lr[10:]) <= 1e-7)


def test_schedule_shapes():
  cosine, linear, constant, rsqrt = _lr('cosine'), _lr('linear'), _lr('constant'), _lr('rsqrt')
  wsd = _lr('wsd', decay_fraction=0.2)
  for decaying in (cosine, linear, wsd):
    assert decaying[100] == pytest.approx(0.1)
  assert cosine[55] == pytest.approx(0.55, abs=1e-6)  # halfway through the cosine: (peak + floor) / 2
  assert linear[32] == pytest.approx(1.0 - 0.9 * 22 / 90, abs=1e-6)
  assert np.all(constant[10:] == 1.0)
  assert rsqrt[40] == pytest.approx(0.5) and rsqrt[90] == pytest.approx(1 / 3)
  assert np.all(wsd[10:81] == 1.0) and wsd[81] < 1.0  # stable until the last 20% of steps, then decays
  assert wsd[85] == pytest.approx(1 - 0.9 * np.sqrt(0.25), abs=1e-6)  # 1 - sqrt cooldown


def test_cosine_is_optax_warmup_cosine():
  """The default schedule is the one the skeleton used (optax's), so existing runs keep their numbers."""
  ref = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.1)
  np.testing.assert_allclose(_lr('cosine'), [float(ref(s)) for s in range(101)], atol=1e-6)


_PARAMS = []


def _params():
  """The tiny model's parameters, initialised once for the module (eager init is slow)."""
  if not _PARAMS:
    _PARAMS.append(jax.jit(init_params, static_argnums=0)(build_model(tiny_config().model),
                                                           jax.random.PRNGKey(0)))
  return _PARAMS[0]


@pytest.mark.parametrize('optimizer', ['adamw', 'lion', 'adafactor'])
@pytest.mark.parametrize('decay_embeddings', [True, False])
def test_weight_decay_spares_norms_and_optionally_embeddings(optimizer, decay_embeddings):
  cfg = tiny_config(('train.optimizer', optimizer), ('train.weight_decay', '0.5'), ('train.warmup_steps', '0'),
                    ('train.grad_clip', '0'), ('train.decay_embeddings', str(decay_embeddings)),
                    ('model.tie_embeddings', 'false'))
  tx = optim.make_optimizer(cfg.train)
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  new = jax.jit(lambda p: optax.apply_updates(p, tx.update(zero, tx.init(p), p)[0]))(params)
  lr = cfg.train.learning_rate
  for path, old in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    got = _at(new, path)
    if 'norm' in name or ('embedding' in name and not decay_embeddings):
      np.testing.assert_array_equal(got, old, err_msg=name)
    else:  # decoupled decay scaled by the learning rate: p <- p * (1 - lr * wd)
      np.testing.assert_allclose(got, old * (1 - lr * 0.5), rtol=1e-5, err_msg=name)


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_lion_takes_sign_steps_of_the_learning_rate():
  cfg = tiny_config(('train.optimizer', 'lion'), ('train.weight_decay', '0'), ('train.warmup_steps', '0'),
                    ('train.grad_clip', '0'), ('train.learning_rate', '0.01'))
  tx = optim.make_optimizer(cfg.train)
  params = {'w': jnp.ones((3, 4))}
  grads = {'w': jnp.arange(12.0).reshape(3, 4) - 5.5}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.01 * np.sign(grads['w']), rtol=1e-6)


def test_adafactor_factors_large_matrices_and_descends():
  cfg = tiny_config(('train.optimizer', 'adafactor'), ('train.weight_decay', '0'), ('train.warmup_steps', '0'),
                    ('train.learning_rate', '0.05'))
  tx = optim.make_optimizer(cfg.train)
  target = jax.random.normal(jax.random.PRNGKey(0), (256, 512))
  params = {'w': jnp.zeros((256, 512))}
  state = tx.init(params)
  state_floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert state_floats < 2 * (256 + 512)  # row and column statistics, not a 256 x 512 second moment
  loss = lambda p: jnp.mean((p['w'] - target) ** 2)  # noqa: E731
  before = loss(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.5 * before


def test_bfloat16_optimizer_state_stores_moments_in_bfloat16_and_updates_alike():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01) * jnp.sign(p + 1e-3), params)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    tx = optim.make_optimizer(tiny_config(('train.opt_state_dtype', dtype), ('train.warmup_steps', '0')).train)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
      updates, state = update(grads, state, params)
    floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim]
    assert floats and set(floats) == {jnp.dtype(dtype)}
    out[dtype] = updates
  for a, b in zip(jax.tree.leaves(out['float32']), jax.tree.leaves(out['bfloat16'])):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6)


def test_skip_nonfinite_leaves_params_and_state_and_counts():
  cfg = tiny_config(('train.skip_nonfinite', 'true'), ('train.warmup_steps', '0'))
  tx = optim.make_optimizer(cfg.train)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
  updates, after_bad = update(bad, state, params, finite=jnp.bool_(True))
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  schedule_counts = lambda s: [x.count for x in jax.tree.leaves(  # noqa: E731
      s, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)) if isinstance(x, optax.ScaleByScheduleState)]
  moments = lambda s: jax.tree.leaves(jax.tree.map(  # noqa: E731
      lambda x: None if isinstance(x, optax.ScaleByScheduleState) else x, s.inner,
      is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)))
  for a, b in zip(moments(after_bad), moments(state)):
    np.testing.assert_array_equal(a, b)
  assert [int(c) for c in schedule_counts(after_bad)] == [1]  # the schedule's clock runs on
  assert int(optim.skipped_count(after_bad)) == 1
  # A non-finite loss skips too, even when the gradients look finite.
  _, after_loss = update(good, after_bad, params, finite=jnp.bool_(False))
  assert int(optim.skipped_count(after_loss)) == 2
  updates, after_good = update(good, after_loss, params, finite=jnp.bool_(True))
  assert int(optim.skipped_count(after_good)) == 2
  assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('optimizer', ['adamw', 'lion', 'adafactor'])
def test_after_skipped_steps_the_applied_rate_is_the_logged_one_and_the_decay_ends_on_time(optimizer):
  """The train step logs schedule(state.step); a skip must not shift the schedule the optimizer applies."""
  cfg = tiny_config(('train.optimizer', optimizer), ('train.skip_nonfinite', 'true'), ('train.steps', '8'),
                    ('train.warmup_steps', '0'), ('train.schedule', 'linear'), ('train.min_lr_ratio', '0.0'),
                    ('train.learning_rate', '1.0'), ('train.weight_decay', '0.0'), ('train.grad_clip', '0.0'))
  tx, lr = optim.make_optimizer(cfg.train), optim.schedule(cfg.train)
  params = {'w': jnp.zeros((4,))}
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(9):
    g = jnp.full((4,), jnp.nan if step in (2, 3) else 1.0)
    updates, state = update({'w': g}, state, params, finite=jnp.bool_(True))
    # A sign step of every optimizer here (constant gradient: Adam's m / sqrt(v) = 1, Lion's sign,
    # Adafactor's clipped RMS 1): the update is the applied rate.
    applied = 0.0 if step in (2, 3) else -float(updates['w'][0])
    want = 0.0 if step in (2, 3) else float(lr(step))
    assert applied == pytest.approx(want, abs=1e-4), step
  assert float(lr(8)) == 0.0  # the last step ran at the end of the decay, as the config says


@pytest.mark.parametrize('optimizer,param_shaped', [('adamw', 2), ('lion', 1), ('adafactor', 0)])
def test_optimizer_state_is_sharded_like_its_parameters(optimizer, param_shaped):
  """Moments shaped like a parameter are sharded like it; Adafactor's factored statistics are replicated."""
  cfg = tiny_config(('train.optimizer', optimizer), ('mesh.fsdp', '2'), ('mesh.tensor', '2'),
                    ('train.skip_nonfinite', 'true'), ('train.opt_state_dtype', 'bfloat16'),
                    ('model.embed_dim', '128'), ('model.mlp_dim', '256'))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  factory = StateFactory(build_model(cfg.model), optim.make_optimizer(cfg.train), mesh, rules)
  state = factory.init(0)
  gate = state.params['layers']['mlp']['gate']
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, ('fsdp', 'sequence'), 'tensor')
  found, factored = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    if not jax.tree_util.keystr(path).endswith("['layers']['mlp']['gate']"):
      continue
    if leaf.shape == gate.shape:
      assert leaf.sharding.spec == gate.sharding.spec
      found += 1
    elif leaf.ndim == 2:  # Adafactor's row / column statistics
      assert leaf.sharding.is_fully_replicated
      factored += 1
  assert found == param_shaped
  assert factored == (2 if optimizer == 'adafactor' else 0)
