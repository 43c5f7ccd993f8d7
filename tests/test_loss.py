"""The loss: chunked cross-entropy equals the plain one, label smoothing and z-loss equal their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from llm_jax.models import build_model
from llm_jax.train.loss import LossConfig, chunked_token_sums, objective_sum, token_sums
from llm_jax.train.state import init_params
from llm_jax.train.step import loss_and_stats

B, T, D, V = 2, 16, 8, 40


def _data(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(keys[0], (B, T, D))
  w = jax.random.normal(keys[1], (D, V)) * 2.0
  targets = jax.random.randint(keys[2], (B, T), 0, V)
  mask = (jax.random.uniform(keys[3], (B, T)) > 0.25).astype(jnp.int32)
  return x, w, targets, mask


def test_sums_match_optax_reference_with_label_smoothing_and_z_loss():
  x, w, targets, mask = _data()
  logits = jnp.einsum('BTD,DV->BTV', x, w)
  eps = 0.1
  sums = token_sums(logits, targets, mask, label_smoothing=eps, with_accuracy=True)
  m = np.asarray(mask, np.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  smoothed = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, V), eps))
  lse = jax.nn.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(sums['nll_sum'], (nll * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['smooth_sum'], (smoothed * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['z_sum'], (lse ** 2 * m).sum(), rtol=1e-5)
  assert sums['tokens'] == m.sum()
  assert sums['correct'] == ((np.argmax(logits, -1) == targets) * m).sum()
  assert abs(float(sums['smooth_sum'] - sums['nll_sum'])) > 1e-3  # smoothing changed something
  cfg = LossConfig(z_loss=1e-2, label_smoothing=eps)
  np.testing.assert_allclose(objective_sum(sums, cfg), sums['smooth_sum'] + 1e-2 * sums['z_sum'], rtol=1e-6)


@pytest.mark.parametrize('chunk', [1, 4, 8])
def test_chunked_equals_plain_in_value_and_gradient(chunk):
  x, w, targets, mask = _data(1)

  def plain(x, w):
    s = token_sums(jnp.einsum('BTD,DV->BTV', x, w), targets, mask, 0.1, with_accuracy=True)
    return s['smooth_sum'] + 1e-3 * s['z_sum'], s

  def chunked(x, w):
    s = chunked_token_sums(x, w, targets, mask, chunk, jnp.float32, 0.1, with_accuracy=True)
    return s['smooth_sum'] + 1e-3 * s['z_sum'], s

  (v1, s1), g1 = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(x, w)
  (v2, s2), g2 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(x, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for k in s1:
    np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, err_msg=k)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_holds_the_whole_batch_logits():
  """The jaxpr of the chunked loss and its gradient has no [B, T, V] array; the plain one does."""
  x, w, targets, mask = _data(2)

  def shapes(fn):
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, w)
    out = set()

    def walk(jp):
      for eqn in jp.eqns:
        for var in eqn.outvars:
          out.add(tuple(getattr(var.aval, 'shape', ())))
        for p in eqn.params.values():
          for sub in (p if isinstance(p, (list, tuple)) else [p]):
            if hasattr(sub, 'jaxpr'):
              walk(sub.jaxpr if hasattr(sub.jaxpr, 'eqns') else sub.jaxpr.jaxpr)
            elif hasattr(sub, 'eqns'):
              walk(sub)
    walk(jaxpr.jaxpr)
    return out

  plain = shapes(lambda x, w: token_sums(jnp.einsum('BTD,DV->BTV', x, w), targets, mask)['nll_sum'])
  chunked = shapes(lambda x, w: chunked_token_sums(x, w, targets, mask, 4, jnp.float32)['nll_sum'])
  assert (B, T, V) in plain
  assert (B, T, V) not in chunked and (B, 4, V) in chunked


def test_model_loss_is_the_same_chunked_and_with_bfloat16_logits_close():
  cfg = tiny_config()
  model = build_model(cfg.model)
  params = init_params(model, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.data.seq_len), 4, cfg.model.vocab_size)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, 1), 'loss_mask': jnp.ones_like(tokens),
           'positions': jnp.broadcast_to(jnp.arange(cfg.data.seq_len), tokens.shape),
           'segment_ids': jnp.ones_like(tokens)}
  plain, _ = loss_and_stats(model, params, batch, loss_cfg=LossConfig(z_loss=1e-4))
  chunked, _ = loss_and_stats(model, params, batch, loss_cfg=LossConfig(z_loss=1e-4, chunk=16))
  np.testing.assert_allclose(plain, chunked, rtol=1e-6)
  bf16 = build_model(tiny_config(('model.logits_dtype', 'bfloat16')).model)
  args = (tokens, batch['positions'], batch['segment_ids'])
  assert model.apply({'params': params}, *args)[0].dtype == jnp.float32
  assert bf16.apply({'params': params}, *args)[0].dtype == jnp.bfloat16
  low, _ = loss_and_stats(bf16, params, batch, loss_cfg=LossConfig(chunk=16))
  np.testing.assert_allclose(plain, low, rtol=2e-2)


def test_chunked_loss_soft_caps_the_logits_as_the_model_does():
  cfg = tiny_config(('model.final_logit_softcap', '0.05'))  # below the initial logits' size: the cap bites
  model = build_model(cfg.model)
  params = init_params(model, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.data.seq_len), 4, cfg.model.vocab_size)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, 1), 'loss_mask': jnp.ones_like(tokens),
           'positions': jnp.broadcast_to(jnp.arange(cfg.data.seq_len), tokens.shape),
           'segment_ids': jnp.ones_like(tokens)}
  plain, _ = loss_and_stats(model, params, batch, loss_cfg=LossConfig())
  chunked, _ = loss_and_stats(model, params, batch, loss_cfg=LossConfig(chunk=16))
  uncapped, _ = loss_and_stats(build_model(tiny_config().model), params, batch, loss_cfg=LossConfig())
  np.testing.assert_allclose(plain, chunked, rtol=1e-6)
  assert abs(float(plain) - float(uncapped)) > 1e-3


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_output_layer_gradients_equal_autodiff_of_the_plain_matmul(dtype):
  """project()'s hand-written backward (the weight gradient as a plain matmul over x's transpose) gives what
  autodiff of the einsum gives, for both inputs, in float32 and bfloat16, with a soft-cap on top."""
  from llm_jax.models.transformer import project
  dt = jnp.dtype(dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 16)).astype(dt)
  w = jax.random.normal(jax.random.PRNGKey(1), (16, 40)).astype(dt)
  t = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 40))

  def ours(x, w):
    return jnp.sum(t * project(x, w, jnp.float32, cap=5.0))

  def plain(x, w):
    logits = jnp.einsum('BTD,DV->BTV', x, w, preferred_element_type=jnp.float32)
    return jnp.sum(t * 5.0 * jnp.tanh(logits / 5.0))

  got, want = jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)
  for g, h in zip(got, want):
    assert g.dtype == h.dtype == dt
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                               rtol=2e-2 if dtype == 'bfloat16' else 1e-5, atol=1e-5)
