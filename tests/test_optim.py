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
from llm_jax.train.state import StateFactory, init_params, param_logical_specs


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


@pytest.mark.parametrize('optimizer', ['adamw', 'lion', 'adafactor', 'muon'])
@pytest.mark.parametrize('decay_embeddings', [True, False])
def test_weight_decay_spares_norms_and_optionally_embeddings(optimizer, decay_embeddings):
  cfg = tiny_config(('train.optimizer', optimizer), ('train.weight_decay', '0.5'), ('train.warmup_steps', '0'),
                    ('train.grad_clip', '0'), ('train.decay_embeddings', str(decay_embeddings)),
                    ('model.tie_embeddings', 'false'))
  tx = optim.make_optimizer(cfg.train, param_logical_specs(build_model(cfg.model)))
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


# ---------------------------------------------------------------------------------------------------------
# Muon


def _muon_setup(*over):
  cfg = tiny_config(('train.optimizer', 'muon'), ('train.warmup_steps', '0'), ('train.grad_clip', '0'),
                    ('train.learning_rate', '1.0'), ('train.weight_decay', '0'), *over)
  specs = param_logical_specs(build_model(cfg.model))
  return cfg, specs, optim.make_optimizer(cfg.train, specs)


def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_norms_and_output_to_adamw():
  _, specs, _ = _muon_setup()
  dims = optim.muon_dimensions(specs)
  flat = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))}
  # The tiny variant scans its layers: axis 0 is 'layers', a batch axis of the orthogonalisation.
  assert tuple(flat["['layers']['attn']['q']"]) == ((1,), (2, 3))  # embed -> heads x head_dim
  assert tuple(flat["['layers']['attn']['o']"]) == ((1, 2), (3,))  # heads x head_dim -> embed
  assert tuple(flat["['layers']['mlp']['gate']"]) == ((1,), (2,))
  assert tuple(flat["['layers']['mlp']['down']"]) == ((1,), (2,))
  for name in ("['embedding']", "['unembed']", "['final_norm']['scale']", "['layers']['attn_norm']['scale']"):
    assert flat[name] is None, name


def test_muon_orthogonalises_a_matrix_update_to_adamw_scale_and_adam_updates_the_rest():
  cfg, specs, tx = _muon_setup()
  params = _params()
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  # The queries' gradient, per layer: one direction dominates, a thousand times the typical other one.
  q_shape = params['layers']['attn']['q'].shape  # [layers, embed, heads, head_dim]
  u = jax.random.normal(next(keys), (q_shape[0], q_shape[1], 1))
  v = jax.random.normal(next(keys), (q_shape[0], 1, q_shape[2] * q_shape[3]))
  noise = jax.random.normal(next(keys), (q_shape[0], q_shape[1], q_shape[2] * q_shape[3]))
  grads['layers']['attn']['q'] = (100.0 * u @ v + noise).reshape(q_shape)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  q = np.asarray(updates['layers']['attn']['q'][0]).reshape(64, -1)  # layer 0: [embed, heads * head_dim]
  g = np.asarray(grads['layers']['attn']['q'][0]).reshape(64, -1)
  s_update, s_grad = np.linalg.svd(q, compute_uv=False), np.linalg.svd(g, compute_uv=False)
  median = lambda s: float(np.median(s) / s[0])  # noqa: E731
  assert median(s_grad) < 0.003
  assert median(s_update) > 0.3  # orthogonalised: the typical direction moves nearly as far as the dominant one
  rms = float(np.sqrt(np.mean(q ** 2)))
  assert 0.1 < rms < 0.3  # consistent_rms=0.2: AdamW's typical update size at learning rate 1
  # Embeddings take AdamW's first step, -lr * g / (|g| + eps): a sign step.
  emb = np.asarray(updates['embedding'])
  np.testing.assert_allclose(emb, -np.sign(np.asarray(grads['embedding'])), atol=1e-3)


def test_muon_state_is_sharded_like_its_parameters():
  cfg = tiny_config(('train.optimizer', 'muon'), ('mesh.fsdp', '2'), ('mesh.tensor', '2'),
                    ('model.embed_dim', '128'), ('model.mlp_dim', '256'))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  factory = StateFactory(model, optim.make_optimizer(cfg.train, param_logical_specs(model)), mesh, rules)
  state = factory.init(0)
  gate = state.params['layers']['mlp']['gate']
  shaped = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if jax.tree_util.keystr(path).endswith("['layers']['mlp']['gate']") and leaf.shape == gate.shape]
  assert len(shaped) == 1  # Muon's momentum, no second moment
  assert shaped[0].sharding.spec == gate.sharding.spec


def test_muon_is_refused_for_lora_adapters():
  from llm_jax.errors import UserError
  with pytest.raises(UserError, match='train.optimizer'):
    tiny_config(('train.optimizer', 'muon'), ('model.lora.rank', '4'))
