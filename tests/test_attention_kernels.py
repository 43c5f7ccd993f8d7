"""The Pallas attention kernels (splash on TPU, flash on GPU), run for real in interpret mode on the CPU: values
and gradients equal the XLA path on packed rows (several documents, padding), causal and bidirectional,
grouped-query, on an 8-device fsdp x tensor mesh; training steps lose what XLA's lose; one document per row
gives what the same documents give packed; prefill through the kernel equals the cache path; 'auto' picks
the platform's kernel and a kernel that cannot honour the call refuses with the key named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import attention_kernels as kernels, build_model, init_cache, layers
from llm_jax.train.state import init_params

KERNELS = ('splash', 'pallas_gpu')
# T = 256 over blocks of 128: two blocks each way, so the kernels' block skipping and the documents that
# cross block edges are exercised (the hardware default is 512; the tiling logic is the same).
BLOCKS = (('model.attention_block_q', '128'), ('model.attention_block_kv', '128'))


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
  monkeypatch.setattr(kernels, 'INTERPRET', True)


def _packed(B=2, T=256):
  """Rows of several documents that cross block edges, then padding (segment 0)."""
  lengths = [[70, 100, 40, 10], [5, 150, 60, 20]]
  segs = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    start = 0
    for i, n in enumerate(lengths[b % 2]):
      segs[b, start:start + n] = i + 1
      pos[b, start:start + n] = np.arange(n)
      start += n
    pos[b, start:] = np.arange(T - start)  # padding's positions count on; padding is never in the loss
  return jnp.asarray(pos), jnp.asarray(segs)


def _qkv(B, T, N=4, K=2, H=32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
          jax.random.normal(kv, (B, T, K, H)))


def _value_and_grads(impl, q, k, v, pos, segs, causal, w):
  cfg = tiny_config(('model.attention_impl', impl), *BLOCKS).model

  def loss(q, k, v):
    out = layers.attend(q, k, v, pos, segs, None, cfg, causal)
    return jnp.sum(out * w), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _assert_close(ours, ref, real, tol=2e-5):
  real = np.asarray(real)
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], atol=tol, rtol=tol)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('impl', KERNELS)
def test_kernel_values_and_gradients_equal_xla_on_packed_rows(impl, causal):
  pos, segs = _packed()
  q, k, v = _qkv(*segs.shape)
  # The loss weighs real tokens only: what padding queries see is the kernels' business, never the loss's.
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape) * (segs > 0)[:, :, None, None]
  out, grads = _value_and_grads(impl, q, k, v, pos, segs, causal, w)
  ref_out, ref_grads = _value_and_grads('xla', q, k, v, pos, segs, causal, w)
  real = segs > 0
  _assert_close(out, ref_out, real)
  for g, r in zip(grads, ref_grads):
    _assert_close(g, r, real)
  # The documents matter: without segments the second document of row 0 would see the first.
  mixed = layers.dot_attention(q, k, v, layers.attention_mask(pos, real, pos, real, causal))
  assert not np.allclose(np.asarray(out)[0, 70:170], np.asarray(mixed)[0, 70:170], atol=1e-3)


@pytest.mark.parametrize('impl', KERNELS)
def test_kernel_on_an_fsdp_tensor_mesh_equals_xla(impl):
  cfg = tiny_config(('mesh.data', '1'), ('mesh.fsdp', '4'), ('mesh.tensor', '2'), ('model.attention_impl', impl),
                    *BLOCKS)
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  pos, segs = _packed(B=4)
  q, k, v = _qkv(4, segs.shape[1])
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape) * (segs > 0)[:, :, None, None]

  def run(model_cfg, q, k, v, pos, segs):
    with sharding.activation_sharding(mesh, rules):
      def loss(q, k, v):
        return jnp.sum(layers.attend(q, k, v, pos, segs, None, model_cfg, True) * w)
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  spec = lambda *names: NamedSharding(mesh, sharding.logical_to_spec(names, rules))
  args = [jax.device_put(q, spec('batch', 'seq', 'heads', 'head_dim')),
          jax.device_put(k, spec('batch', 'seq', 'kv_heads', 'head_dim')),
          jax.device_put(v, spec('batch', 'seq', 'kv_heads', 'head_dim')),
          jax.device_put(pos, spec('batch', 'seq')), jax.device_put(segs, spec('batch', 'seq'))]
  with sharding.activation_sharding(mesh, rules):
    assert sharding.split_count('batch') == 4 and sharding.split_count('heads') == 2
  loss, grads = jax.jit(lambda *a: run(cfg.model, *a))(*args)
  xla_cfg = tiny_config(('model.attention_impl', 'xla')).model
  ref_loss, ref_grads = jax.jit(lambda *a: run(xla_cfg, *a))(*args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    _assert_close(g, r, segs > 0)
