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


def _lm_batch(tokens):
  return {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1), 'loss_mask': jnp.ones_like(tokens),
          'positions': _positions(*tokens.shape), 'segment_ids': jnp.ones_like(tokens)}


@pytest.mark.parametrize('remat', ['full', 'dots_no_batch', 'save_attention'])
def test_remat_does_not_change_loss_or_grads(remat):
  from llm_jax.train.step import loss_and_stats
  _, model, params = _setup()
  rematted = build_model(tiny_config(('model.remat', remat)).model)
  batch = _lm_batch(_tokens(3))
  def value_and_grad(m):
    return jax.jit(jax.value_and_grad(lambda p: loss_and_stats(m, p, batch)[0]))(params)
  (loss, grads), (loss_r, grads_r) = value_and_grad(model), value_and_grad(rematted)
  np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def _saved_per_layer(remat):
  """Shapes of the per-layer activations the backward pass keeps (stacked [L, ...] outputs of the scan)."""
  import contextlib
  import io
  import re
  from llm_jax.train.step import loss_and_stats
  cfg, _, params = _setup()
  model = build_model(tiny_config(('model.remat', remat)).model)
  batch = _lm_batch(_tokens(4))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda p: loss_and_stats(model, p, batch)[0], params)
  shapes = [tuple(int(d) for d in m.split(','))
            for m in re.findall(r'^f32\[([\d,]+)\] output of scan', out.getvalue(), flags=re.M)]
  return sorted(s for s in shapes if len(s) >= 4)  # [L, B, T, ...]; the scan's final carry is [B, T, D]


def test_remat_policies_keep_what_their_names_say():
  cfg = tiny_config().model
  L, D, N, K, H = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x, q_or_out, kv = (L, B, T, D), (L, B, T, N, H), (L, B, T, K, H)
  assert _saved_per_layer('full') == [x]  # only each block's input
  # q, k, v and the attention output, named in layers.Attention.
  assert _saved_per_layer('save_attention') == sorted([x, q_or_out, q_or_out, kv, kv])


def test_bfloat16_compute_keeps_float32_master_weights_and_gradients():
  from llm_jax.train.step import loss_and_stats
  _, model, params = _setup()
  bf16 = build_model(tiny_config(('model.dtype', 'bfloat16')).model)
  batch = _lm_batch(_tokens(5))
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_and_stats(model, p, batch)[0]))(params)
  loss16, grads16 = jax.jit(jax.value_and_grad(lambda p: loss_and_stats(bf16, p, batch)[0]))(params)
  assert {g.dtype for g in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  logits = bf16.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])[0]
  assert logits.dtype == jnp.float32  # model.logits_dtype
  np.testing.assert_allclose(loss, loss16, rtol=1e-2)
  assert float(loss) != float(loss16)  # it really computed in bfloat16
  # 'auto' is float32 on this CPU-only test machine.
  assert build_model(tiny_config(('model.dtype', 'auto')).model).apply(
      {'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])[0].tolist() == \
      model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])[0].tolist()


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
