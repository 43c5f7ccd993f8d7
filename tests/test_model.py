"""Properties of the decoder: causality, document isolation in packed rows, scan == loop, cache == full."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llm_jax.models import build_model, init_cache
from llm_jax.train.state import init_params

B, T = 2, 16


def _setup(*overrides):
  cfg = tiny_config(*overrides)
  model = build_model(cfg.model)
  params = init_params(model, jax.random.PRNGKey(0))
  return cfg, model, params


def _positions(b=B, t=T):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _tokens(seed, b=B, t=T, vocab=512):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 4, vocab, dtype=jnp.int32)


def _logits(model, params, tokens, positions=None, segments=None):
  positions = _positions(*tokens.shape) if positions is None else positions
  segments = jnp.ones_like(tokens) if segments is None else segments
  return model.apply({'params': params}, tokens, positions, segments)[0]


def test_future_token_never_changes_past_logits():
  _, model, params = _setup()
  tokens = _tokens(0)
  base = _logits(model, params, tokens)
  for t in (0, 5, T - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % 512)
    out = _logits(model, params, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    # ...and the change is visible from t on, so the test could fail.
    assert not np.allclose(out[:, t:], base[:, t:])


def test_packed_documents_never_see_each_other():
  _, model, params = _setup()
  tokens = _tokens(1)
  # Row: document 1 in [0, 6), document 2 in [6, 13), padding after; positions restart per document.
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3] * B, jnp.int32)
  positions = jnp.array([list(range(6)) + list(range(7)) + [0] * 3] * B, jnp.int32)
  base = _logits(model, params, tokens, positions, segments)
  changed_doc1 = tokens.at[:, 2].set((tokens[:, 2] + 11) % 512)
  out = _logits(model, params, changed_doc1, positions, segments)
  np.testing.assert_array_equal(np.asarray(out[:, 6:13]), np.asarray(base[:, 6:13]))
  assert not np.allclose(out[:, 2:6], base[:, 2:6])
  changed_doc2 = tokens.at[:, 8].set((tokens[:, 8] + 11) % 512)
  out = _logits(model, params, changed_doc2, positions, segments)
  np.testing.assert_array_equal(np.asarray(out[:, :6]), np.asarray(base[:, :6]))
  # A packed document is scored exactly as if it were alone at the start of a row.
  alone = _logits(model, params, tokens[:, 6:13], positions[:, 6:13], jnp.ones((B, 7), jnp.int32))
  np.testing.assert_allclose(np.asarray(base[:, 6:13]), np.asarray(alone), atol=1e-5, rtol=1e-5)


def test_scanned_layers_equal_python_loop():
  cfg, scanned, params = _setup()
  looped = build_model(tiny_config(('model.scan_layers', 'false')).model)
  loop_params = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(cfg.model.num_layers):
    loop_params[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], params['layers'])
  # The unrolled model has the same parameter tree shape as this conversion, or apply would fail.
  expected = jax.tree.map(jnp.shape, init_params(looped, jax.random.PRNGKey(0)))
  assert jax.tree.map(jnp.shape, loop_params) == expected
  tokens = _tokens(2)
  np.testing.assert_allclose(np.asarray(_logits(scanned, params, tokens)),
                             np.asarray(_logits(looped, loop_params, tokens)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('remat', ['full', 'dots_no_batch'])
def test_remat_does_not_change_loss_or_grads(remat):
  from llm_jax.train.step import loss_and_stats
  _, model, params = _setup()
  rematted = build_model(tiny_config(('model.remat', remat)).model)
  tokens = _tokens(3)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1), 'loss_mask': jnp.ones_like(tokens),
           'positions': _positions(), 'segment_ids': jnp.ones_like(tokens)}
  grad = lambda m: jax.grad(lambda p: loss_and_stats(m, p, batch)[0])(params)  # noqa: E731
  for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_cache_logits_match_full_forward():
  cfg, model, params = _setup()
  tokens = _tokens(4)
  full = _logits(model, params, tokens)
  cache = init_cache(cfg.model, B, T)
  # Prefill 10 tokens, then feed the rest one at a time through the cache.
  logits, cache = model.apply({'params': params}, tokens[:, :10], _positions(B, 10),
                              jnp.ones((B, 10), jnp.int32), cache=cache)
  steps = [logits]
  for t in range(10, T):
    logits, cache = model.apply({'params': params}, tokens[:, t:t + 1], jnp.full((B, 1), t, jnp.int32),
                                jnp.ones((B, 1), jnp.int32), cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full),
                             atol=1e-4, rtol=1e-4)
