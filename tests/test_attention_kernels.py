"""The Pallas attention kernels (splash on TPU, flash on GPU), run for real in interpret mode on the CPU: values
and gradients equal the XLA path on packed rows (several documents, padding), causal and bidirectional,
grouped-query, on an 8-device fsdp x tensor mesh; training steps lose what XLA's lose; one document per row
gives what the same documents give packed; prefill through the kernel equals the cache path; 'auto' picks
the platform's kernel and a kernel that cannot honour the call refuses with the key named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import tiny_config
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import attention, attention_kernels as kernels, build_model, init_cache
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
    out = attention.attend(q, k, v, pos, segs, None, cfg, causal)
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
  mixed = attention.dot_attention(q, k, v, attention.attention_mask(pos, real, pos, real, causal))
  assert not np.allclose(np.asarray(out)[0, 70:170], np.asarray(mixed)[0, 70:170], atol=1e-3)


def test_splash_with_its_hardware_tiles_equals_xla():
  """The default tiles (512 x 512, what a TPU runs; the GPU kernel's defaults are the tests' own already) on
  one row of 512 holding documents that cross the middle, and a row padded up to the tile (300 tokens)."""
  q, k, v = _qkv(1, 512, N=2, K=1)
  segs = jnp.asarray(np.repeat([1, 2, 3, 0], [200, 250, 50, 12])[None].astype(np.int32))
  pos = jnp.asarray(np.concatenate([np.arange(200), np.arange(250), np.arange(50), np.arange(12)])[None])
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape) * (segs > 0)[:, :, None, None]
  model_cfg = tiny_config(('model.attention_impl', 'splash')).model
  assert kernels.blocks('splash', model_cfg, 512) == (512, 512, 512)
  assert kernels.blocks('splash', model_cfg, 300) == (384, 384, 384)

  def loss(cfg, q, k, v, pos, segs, w):
    return jnp.sum(attention.attend(q, k, v, pos, segs, None, cfg, True) * w)
  xla_cfg = tiny_config(('model.attention_impl', 'xla')).model
  for T in (512, 300):
    args = (q[:, :T], k[:, :T], v[:, :T], pos[:, :T], segs[:, :T], w[:, :T])
    ours = jax.grad(loss, argnums=(1, 2, 3))(model_cfg, *args)
    ref = jax.grad(loss, argnums=(1, 2, 3))(xla_cfg, *args)
    for g, r in zip(ours, ref):
      _assert_close(g, r, segs[:, :T] > 0)


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
        return jnp.sum(attention.attend(q, k, v, pos, segs, None, model_cfg, True) * w)
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


def _model(impl, *overrides):
  cfg = tiny_config(('model.attention_impl', impl), *BLOCKS, *overrides)
  model = build_model(cfg.model)
  return cfg, model, init_params(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize('impl', ('xla',) + KERNELS)
def test_one_document_per_row_gives_what_the_documents_give_packed(impl):
  """Every attention_impl that runs on the CPU ('auto' is 'xla' there; 'cudnn' needs a GPU, its call with XLA
  underneath is checked in test_attention_impl.py)."""
  _, model, params = _model(impl)
  lengths, T = (40, 60, 20), 128
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, T), 4, 512, dtype=jnp.int32)
  segs = np.zeros((1, T), np.int32)
  pos = np.zeros((1, T), np.int32)
  alone_tokens = np.zeros((len(lengths), T), np.int32)
  alone_segs = np.zeros((len(lengths), T), np.int32)
  start = 0
  for i, n in enumerate(lengths):
    segs[0, start:start + n], pos[0, start:start + n] = i + 1, np.arange(n)
    alone_tokens[i, :n], alone_segs[i, :n] = tokens[0, start:start + n], 1
    start += n
  alone_pos = np.broadcast_to(np.arange(T, dtype=np.int32), (len(lengths), T))
  packed = model.apply({'params': params}, tokens, jnp.asarray(pos), jnp.asarray(segs))[0]
  alone = model.apply({'params': params}, jnp.asarray(alone_tokens), jnp.asarray(alone_pos),
                      jnp.asarray(alone_segs))[0]
  start = 0
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(packed[0, start:start + n]), np.asarray(alone[i, :n]), atol=2e-5,
                               rtol=2e-5)
    start += n


@functools.lru_cache(maxsize=None)
def _training_losses(impl):
  """Losses of three train steps (the real jitted step) on rows of two documents each."""
  from test_sharding import _batch
  from llm_jax.train import optim
  from llm_jax.train.state import StateFactory
  from llm_jax.train.step import make_train_step
  cfg = tiny_config(('mesh.data', '1'), ('data.batch_size', '2'), ('data.shards', '1'),
                    ('model.attention_impl', impl), *BLOCKS)
  mesh, rules = sharding.make_mesh(cfg.mesh, jax.devices()[:1]), sharding.rules_from_config(cfg.mesh)
  model, tx = build_model(cfg.model), optim.make_optimizer(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh)
  state, losses = factory.init(cfg.seed), []
  for seed in range(3):
    state, metrics = step(state, {k: jax.device_put(v, batch_sh) for k, v in _batch(cfg, seed).items()})
    losses.append(float(metrics['loss']))
  return losses


@pytest.mark.parametrize('impl', KERNELS)
def test_training_steps_lose_what_xla_loses(impl):
  ours, ref = _training_losses(impl), _training_losses('xla')
  np.testing.assert_allclose(ours, ref, rtol=2e-5)
  assert ref[2] < ref[0]  # the steps trained: the comparison is of a moving loss


def test_prefill_through_the_kernel_equals_the_cache_path():
  cfg, model, params = _model('splash')  # pallas_gpu takes the same path through attention.attend
  B, P = 2, 10
  tokens = jax.random.randint(jax.random.PRNGKey(5), (B, P + 1), 4, 512, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  outs = []
  for prefill in (True, False):  # the kernel over the prompt itself / XLA over the cache's slots
    cache = init_cache(cfg.model, B, P + 4)
    logits, cache = model.apply({'params': params}, tokens[:, :P], positions, jnp.ones((B, P), jnp.int32),
                                cache=cache, prefill=prefill)
    step, _ = model.apply({'params': params}, tokens[:, P:], jnp.full((B, 1), P, jnp.int32),
                          jnp.ones((B, 1), jnp.int32), cache=cache)
    outs.append((logits, cache, step))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def _shape(dtype=jnp.bfloat16, **changes):
  base = dict(seq_len=2048, head_dim=128, dtype=jnp.dtype(dtype), has_bias=False, seq_split=1,
              heads_alike=True, heads_divide=True)
  return kernels.Shape(**{**base, **changes})


def test_auto_takes_the_platforms_kernel_where_it_applies(monkeypatch):
  monkeypatch.setattr(kernels, 'INTERPRET', False)
  m = tiny_config().model
  assert kernels.choose('auto', _shape(), m, 'tpu') == 'splash'
  assert kernels.choose('auto', _shape(jnp.float32), m, 'tpu') == 'splash'
  assert kernels.choose('auto', _shape(has_bias=True), m, 'tpu') == 'xla'  # T5's relative bias
  assert kernels.choose('auto', _shape(seq_split=2), m, 'tpu') == 'xla'  # context parallelism
  assert kernels.choose('auto', _shape(), m, 'gpu') == 'pallas_gpu'
  assert kernels.choose('auto', _shape(jnp.float32), m, 'gpu') == 'xla'
  assert kernels.choose('auto', _shape(), m, 'cpu') == 'xla'
  assert kernels.choose('auto', _shape(seq_len=1000), m, 'tpu') == 'splash'  # padded to whole blocks
  assert kernels.blocks('splash', m, 2048) == (512, 512, 2048)
  assert kernels.blocks('splash', m, 1000) == (512, 512, 1024)
  assert kernels.blocks('splash', m, 10) == (128, 128, 128)
  m = tiny_config(*BLOCKS).model
  assert kernels.blocks('splash', m, 1000) == (128, 128, 1024)


@pytest.mark.parametrize('shape,needle', [
    (_shape(), 'needs a TPU'),
    (_shape(has_bias=True), "relative-position bias"),
    (_shape(seq_split=2), 'mesh.sequence'),
    (_shape(heads_alike=False), 'heads'),
])
def test_a_named_kernel_refuses_what_it_cannot_honour(monkeypatch, shape, needle):
  monkeypatch.setattr(kernels, 'INTERPRET', False)
  platform = 'cpu' if needle == 'needs a TPU' else 'tpu'
  with pytest.raises(UserError, match=f"model.attention_impl='splash' .*{needle}"):
    kernels.choose('splash', shape, tiny_config().model, platform)


@pytest.mark.parametrize('overrides,key', [
    ((('model.attention_impl', 'splash'), ('model.position_type', 'relative')), 'model.attention_impl'),
    ((('model.attention_block_q', '100'),), 'model.attention_block_q'),
    ((('model.attention_block_kv', '-128'),), 'model.attention_block_kv'),
])
def test_bad_kernel_config_names_the_key(overrides, key):
  with pytest.raises(UserError, match=key):
    tiny_config(*overrides)
