"""The decoder layouts of Llama 3, Qwen, Mistral and Gemma 2 (config keys of the decoder family): cached
decoding equals the full forward pass, scanned layers equal the loop, a sliding window hides exactly the keys
it should, and the FLOPs count only the keys a query sees. Parity with transformers is in test_hf_parity.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llm_jax import convert
from llm_jax.models import flops
from llm_jax.models import build_model, init_cache
from llm_jax.models.transformer import layer_windows
from llm_jax.train.state import init_params

B, T = 2, 12
LAYOUTS = {
    'llama3_qwen': (('model.rope_scaling.type', 'llama3'), ('model.rope_scaling.factor', '8.0'),
                    ('model.rope_scaling.original_max_positions', '8'), ('model.qkv_bias', 'true'),
                    ('model.qk_norm', 'true')),
    'mistral': (('model.sliding_window', '3'),),
    'gemma2': (('model.sliding_window', '3'), ('model.global_every', '2'), ('model.attn_logit_softcap', '1.5'),
               ('model.final_logit_softcap', '2.0'), ('model.query_scale', '10'), ('model.norm_offset', 'true'),
               ('model.embed_scale', 'true'), ('model.post_norms', 'true'), ('model.mlp_activation', 'gelu_tanh'),
               ('model.tie_embeddings', 'true')),
}


@functools.lru_cache(maxsize=None)
def _setup(name, scan='true'):
  cfg = tiny_config(*LAYOUTS[name], ('model.dtype', 'float32'), ('model.scan_layers', scan))
  model = build_model(cfg.model)
  params = jax.jit(lambda rng: init_params(model, rng))(jax.random.PRNGKey(0))
  # Sharper weights than the initialisation's, so that soft-caps and windows change the numbers.
  params = jax.tree.map(lambda a: a * 4 if a.ndim >= 3 else a, params)
  return cfg, model, params, jax.jit(model.apply)


def _tokens(seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 4, 500, dtype=jnp.int32)


def _pos(t, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (B, t))


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_cached_decoding_equals_the_full_pass(name):
  cfg, model, params, apply = _setup(name)
  tokens = _tokens()
  full, _ = apply({'params': params}, tokens, _pos(T), jnp.ones_like(tokens))
  cache = init_cache(cfg.model, B, T)
  steps = []
  logits, cache = apply({'params': params}, tokens[:, :5], _pos(5), jnp.ones((B, 5), jnp.int32), cache=cache)
  steps.append(logits)
  for t in range(5, T):  # past the window: the cache's early slots must drop out of the local layers
    logits, cache = apply({'params': params}, tokens[:, t:t + 1], _pos(1, t), jnp.ones((B, 1), jnp.int32),
                          cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5, rtol=1e-5)
  if cfg.model.final_logit_softcap:
    assert float(jnp.max(jnp.abs(full))) < cfg.model.final_logit_softcap


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_scanned_layers_equal_the_loop(name):
  _, _, params, apply = _setup(name)
  _, _, _, apply_loop = _setup(name, 'false')
  tokens = _tokens(1)
  args = (tokens, _pos(T), jnp.ones_like(tokens))
  scanned, _ = apply({'params': params}, *args)
  looped, _ = apply_loop({'params': convert.to_layout(params, False)}, *args)
  np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-5, rtol=1e-5)


def _reach(name, changed_at=0):
  """Positions whose logits change when the token at `changed_at` does."""
  _, _, params, apply = _setup(name)
  tokens = _tokens(2)
  other = tokens.at[:, changed_at].set((tokens[:, changed_at] + 7) % 500 + 4)
  a, _ = apply({'params': params}, tokens, _pos(T), jnp.ones_like(tokens))
  b, _ = apply({'params': params}, other, _pos(T), jnp.ones_like(tokens))
  return [t for t in range(T) if not np.allclose(np.asarray(a[:, t]), np.asarray(b[:, t]), atol=1e-6)]


def test_a_sliding_window_hides_keys_that_far_back():
  # Window 3 on both layers: a token reaches 2 positions further per layer, so position 0 reaches 4.
  assert _reach('mistral') == [0, 1, 2, 3, 4]
  # Gemma 2's second layer is global: position 0 reaches every later one.
  assert _reach('gemma2') == list(range(T))


def test_layer_windows_and_flops_count_the_keys_a_query_sees():
  cfg = tiny_config(('model.num_layers', '4'), ('model.sliding_window', '16'), ('model.global_every', '2'))
  m = cfg.model
  assert layer_windows(m, 4) == [16, 0, 16, 0]
  assert layer_windows(tiny_config(('model.sliding_window', '16')).model, 3) == [16, 16, 16]
  full = tiny_config(('model.num_layers', '4')).model
  per_key = 12 * m.num_heads * m.head_dim
  assert flops.flops_per_token(full, 64) - flops.flops_per_token(m, 64) == per_key * 2 * (64 - 16)
  assert flops.flops_per_token(full, 8) == flops.flops_per_token(m, 8)  # rows shorter than the window
