"""model.attention_impl: the call cuDNN runs (jax.nn.dot_product_attention with our mask) equals our own
attention when XLA runs it, 'auto' picks cuDNN only where it applies, and 'cudnn' off a GPU is a user error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import attention, build_model
from llm_jax.train.state import init_params


def _packed_row_inputs(dtype, N=8, K=2, H=16):
  """Two packed rows: documents of several lengths, then padding (segment 0, positions counting on as the
  packer leaves them irrelevant: padding is never in the loss)."""
  segs = np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0] * 1,
                   [1] * 11 + [2] * 2 + [0] * 3], np.int32)
  pos = np.zeros_like(segs)
  for b in range(2):
    for t in range(1, segs.shape[1]):
      pos[b, t] = pos[b, t - 1] + 1 if segs[b, t] == segs[b, t - 1] else 0
  B, T = segs.shape
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (B, T, N, H), dtype)
  k = jax.random.normal(kk, (B, T, K, H), dtype)
  v = jax.random.normal(kv, (B, T, K, H), dtype)
  return q, k, v, jnp.asarray(pos), jnp.asarray(segs)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('causal', [True, False])
def test_fused_xla_path_equals_dot_attention(dtype, tol, causal):
  q, k, v, pos, segs = _packed_row_inputs(dtype)
  mask = attention.attention_mask(pos, segs, pos, segs, causal)
  ours = attention.dot_attention(q, k, v, mask)
  fused = attention.fused_attention(q, k, v, mask, None, True, 'xla', in_order=causal)
  # Real tokens must agree exactly up to rounding; is_causal may only change what padding queries see.
  real = np.asarray(segs) > 0
  np.testing.assert_allclose(np.asarray(fused, np.float32)[real], np.asarray(ours, np.float32)[real],
                             atol=tol, rtol=tol)
  # The segments matter: with only a causal mask the first row's second document would see the first.
  causal_only = attention.fused_attention(q, k, v, jnp.ones_like(mask), None, True, 'xla', in_order=True)
  assert not np.allclose(np.asarray(causal_only, np.float32)[0, 5:12], np.asarray(ours, np.float32)[0, 5:12],
                         atol=tol)


def test_fused_xla_path_equals_dot_attention_unscaled():
  q, k, v, pos, segs = _packed_row_inputs(jnp.float32, N=4, K=4)
  mask = attention.attention_mask(pos, segs, pos, segs, True)
  np.testing.assert_allclose(attention.fused_attention(q, k, v, mask, None, False, 'xla', True)[segs > 0],
                             attention.dot_attention(q, k, v, mask, scale=False)[segs > 0], atol=1e-5, rtol=1e-5)


def test_cudnn_chosen_only_where_it_applies(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  q, k, _, _, _ = _packed_row_inputs(jnp.bfloat16)
  assert attention._cudnn_supported(q, k, None)
  assert not attention._cudnn_supported(q.astype(jnp.float32), k.astype(jnp.float32), None)  # float32
  assert not attention._cudnn_supported(q, k, jnp.zeros((2, 8, 16, 16), jnp.bfloat16))  # T5's bias
  odd = jnp.zeros(q.shape[:-1] + (12,), jnp.bfloat16)
  assert not attention._cudnn_supported(odd, odd, None)  # head dim not a multiple of 8
  assert not attention._cudnn_supported(q[:, :15], k[:, :15], None)  # an odd length
  cfg = tiny_config(('mesh.data', '4'), ('mesh.sequence', '2'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  with sharding.activation_sharding(mesh, rules):
    assert sharding.split_count('seq') == 2
    assert not attention._cudnn_supported(q, k, None)  # context parallelism splits the sequence
  cfg = tiny_config(('mesh.data', '4'), ('mesh.tensor', '2'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  with sharding.activation_sharding(mesh, rules):
    assert sharding.split_count('heads') == 2 and attention._cudnn_supported(q, k, None)  # heads may split


def test_auto_on_cpu_is_xla():
  q, k, v, pos, segs = _packed_row_inputs(jnp.bfloat16)
  assert not attention._cudnn_supported(q, k, None)
  mask = attention.attention_mask(pos, segs, pos, segs, True)
  np.testing.assert_array_equal(attention.attend(q, k, v, pos, segs, None, tiny_config().model, True),
                                attention.dot_attention(q, k, v, mask))


def test_cudnn_off_gpu_is_a_user_error():
  cfg = tiny_config(('model.attention_impl', 'cudnn'))
  model = build_model(cfg.model)
  tokens = jnp.zeros((2, 16), jnp.int32)
  with pytest.raises(UserError, match='model.attention_impl'):
    jax.eval_shape(lambda rng: model.apply({'params': init_params(model, rng)}, tokens, jnp.zeros_like(tokens),
                                           jnp.ones_like(tokens)), jax.random.PRNGKey(0))


def test_unknown_attention_impl_names_the_key():
  with pytest.raises(UserError, match='model.attention_impl'):
    tiny_config(('model.attention_impl', 'flash'))
