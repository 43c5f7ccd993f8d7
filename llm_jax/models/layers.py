"""Blocks shared by the model families: norms, positions (rotary, T5's relative buckets), attention (self or
cross, with a KV cache), MLPs. Which variant runs is read from the `model` config (see config/schema.py).

Einsum letters: B batch, T query length, S key length, D embed, N query heads, K kv heads, G query heads per
kv head (N = K * G), H head dim, F mlp, V vocab, L layers, R relative-position buckets.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); activations are pinned at block
boundaries with `sharding.constrain`. Nothing here names a mesh axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.models.attention import attend, cached_attention, dot_attention, in_window
from llm_jax.models.matmul import matmul
from llm_jax.models.positions import relative_bucket, rope
from llm_jax.sharding import constrain

Array = jax.Array


NORM_TYPES = ('rms', 'layer')
NORM_POSITIONS = ('pre', 'post')
POSITION_TYPES = ('rope', 'learned', 'relative')
ROPE_SCALINGS = ('none', 'llama3', 'linear')  # positions.rope_frequencies
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # the projections lora_delta adapts

ACTIVATIONS = {
    'silu': jax.nn.silu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # BERT: the exact erf form
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),  # GPT-2 and T5 v1.1 ("gelu_new")
    'relu': jax.nn.relu,
}


def compute_dtype(name: str) -> jnp.dtype:
  """`model.dtype` as a dtype: 'auto' is bfloat16 on accelerators (their matmul units run it at full rate,
  float32 master weights keep the updates exact) and float32 on CPU, where bfloat16 matmuls are slower."""
  if name == 'auto':
    return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, names: tuple[str, ...], shape: tuple[int, ...], cfg) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype))


def leading(a: Array, ndim: int) -> Array:
  """`a` with leading axes of size 1 up to `ndim`: the explicit broadcast of a weight over batch and length
  (the suite runs with jax_numpy_rank_promotion='raise', so an implicit one is a shape mistake)."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _bias(module: nn.Module, name: str, names: tuple[str, ...], shape: tuple[int, ...], cfg) -> Array:
  return _param(module, name, nn.initializers.zeros, names, shape, cfg)


def lora_delta(module: nn.Module, name: str, x: Array, in_names: tuple, in_shape: tuple, out_names: tuple,
               out_shape: tuple, cfg) -> Array | None:
  """LoRA's x A B * alpha / rank (Hu et al. 2021) for the projection `name` of kernel in_shape + out_shape,
  or None when `name` is not in model.lora.targets. x's trailing axes are the kernel's input axes. A starts
  random and B at zero, so a new adapter changes nothing; the rank axis is small and never split."""
  lora = cfg.lora
  if not lora.rank or name not in lora.targets:
    return None
  dtype = compute_dtype(cfg.dtype)
  fan_in = math.prod(in_shape)
  a = _param(module, f'{name}_lora_a', nn.initializers.normal(1.0 / math.sqrt(fan_in)), in_names + (None,),
             in_shape + (lora.rank,), cfg).astype(dtype)
  b = _param(module, f'{name}_lora_b', nn.initializers.zeros, (None,) + out_names, (lora.rank,) + out_shape,
             cfg).astype(dtype)
  xa = jnp.tensordot(x, a, axes=len(in_shape))
  return jnp.tensordot(xa, b, axes=1) * (lora.alpha / lora.rank)


class Norm(nn.Module):
  """RMSNorm (LLaMA, T5) or LayerNorm (GPT-2, BERT; with a bias under `use_bias`), by `norm_type`, over the
  last axis, whose logical name is `axis` (Qwen3 norms each head's queries and keys: 'head_dim'). With
  `norm_offset` the gain is 1 + w, w starting at 0 (Gemma stores its gains that way)."""
  cfg: Any
  axis: str = 'embed'

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.cfg
    D = x_BTD.shape[-1]
    init = nn.initializers.zeros if c.norm_offset else nn.initializers.ones
    scale_D = _param(self, 'scale', init, (self.axis,), (D,), c)
    x32 = x_BTD.astype(jnp.float32)
    # Statistics in float32 whatever the compute dtype: bf16 sums of squares lose the small components.
    if c.norm_type == 'layer':
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.norm_eps)
    lead = (1,) * (y.ndim - 1)  # norms apply over the last axis of activations of any rank
    y = y * (scale_D.astype(jnp.float32) + (1.0 if c.norm_offset else 0.0)).reshape(lead + (D,))
    if c.norm_type == 'layer' and c.use_bias:
      y = y + _bias(self, 'bias', (self.axis,), (D,), c).astype(jnp.float32).reshape(lead + (D,))
    return y.astype(compute_dtype(c.dtype))


def relative_bias(module: nn.Module, cfg, name: str, q_positions_BT: Array, k_positions_BS: Array,
                  bidirectional: bool) -> Array:
  """The per-head bias_BNTS T5 adds to attention logits, from one table of R buckets x N heads that every
  layer of a stack shares."""
  table_RN = _param(module, name, nn.initializers.normal(cfg.init_std), ('table', 'heads'),
                    (cfg.relative_buckets, cfg.num_heads), cfg)
  relative_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
  bucket_BTS = relative_bucket(relative_BTS, bidirectional, cfg.relative_buckets, cfg.relative_max_distance)
  bias_BTSN = jnp.take(table_RN, bucket_BTS, axis=0)
  return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(compute_dtype(cfg.dtype))


def stack_pays(x_BTD: Array, width: int) -> bool:
  """Whether two projections of x are better as one matmul over their kernels stacked to `width` outputs:
  x is read once, but the stacked kernels are a new [D, width] array at every call. It pays when x has at
  least as many rows as the stacked kernels have columns (a training or evaluation batch); a decode step's
  few rows would spend more copying the kernels than the matmul takes (a third of a decode step)."""
  return x_BTD.shape[0] * x_BTD.shape[1] >= width


def write_cache(cache: dict[str, Array], k_BTKH: Array, v_BTKH: Array, positions_BT: Array) -> dict:
  """Store new keys and values at each row's own positions (rows of a batch may be at different steps) in the
  cache (keys [B, K, H, S], values [B, K, S, H]: attention.cached_attention)."""
  k, v = k_BTKH.astype(cache['k'].dtype), v_BTKH.astype(cache['v'].dtype)
  B, T = positions_BT.shape
  if B == 1 and T == 1:
    # One row's one token (a decode step alone) as a select over the row's cache. As a scatter (or a
    # dynamic-update-slice), XLA's CPU backend copied every layer's keys and values three times around it,
    # a tenth of a one-row step; with more rows the scatter is cheaper than a pass over all of them.
    S = cache['k'].shape[3]
    hit_S = jnp.arange(S) == positions_BT[0, 0]
    return {'k': jnp.where(hit_S, k.transpose(0, 2, 3, 1), cache['k']),
            'v': jnp.where(hit_S[:, None], v.transpose(0, 2, 1, 3), cache['v'])}
  rows_B1 = jnp.arange(B)[:, None]
  # Indexing rows and positions around the slices selects [B, T, K, H] in both: the new values' own shape.
  return {'k': cache['k'].at[rows_B1, :, :, positions_BT].set(k, mode='drop'),
          'v': cache['v'].at[rows_B1, :, positions_BT].set(v, mode='drop')}


class Attention(nn.Module):
  """Self-attention (causal or bidirectional; rotary or not; plus a relative-position bias if given), or
  with `cross` cross-attention to an encoder's output `kv_BSD` (T5's decoder).

  Caches while decoding: self-attention writes each new key and value at its position; cross-attention
  stores the encoder's keys and values once (`kv_BSD` given with a cache: the prefill) and reads them on
  every later step (`kv_BSD` None). The cache given is this layer's own (transformer.init_layer_caches).
  """
  cfg: Any
  causal: bool = True
  cross: bool = False
  prefill: bool = False  # the cache is empty and this call holds each row from position 0 (decode's prefill)

  def _kernel(self, name: str, heads: int, axis: str) -> Array:
    c = self.cfg
    return _param(self, name, nn.initializers.normal(c.init_std), ('embed', axis, 'head_dim'),
                  (c.embed_dim, heads, c.head_dim), c).astype(compute_dtype(c.dtype))

  def _finish(self, y: Array, x_BxD: Array, name: str, heads: int, axis: str) -> Array:
    """x W (already in y) plus the projection's LoRA delta and bias, where it has them."""
    c = self.cfg
    delta = lora_delta(self, name, x_BxD, ('embed',), (c.embed_dim,), (axis, 'head_dim'), (heads, c.head_dim), c)
    if delta is not None:
      y = y + delta
    if c.use_bias or (c.qkv_bias and name in ('q', 'k', 'v')):
      y = y + leading(_bias(self, f'{name}_bias', (axis, 'head_dim'), (heads, c.head_dim), c).astype(y.dtype), y.ndim)
    return y

  def _project(self, x_BxD: Array, name: str, heads: int, axis: str) -> Array:
    return self._finish(matmul(x_BxD, self._kernel(name, heads, axis)), x_BxD, name, heads, axis)

  def _project_kv(self, x_BxD: Array) -> tuple[Array, Array]:
    """Keys and values in one matmul over their kernels stacked [D, 2, K, H] (x read once, one wider matmul,
    as the MLP's gate and up); the parameters stay two."""
    K = self.cfg.num_kv_heads
    kernels = [self._kernel(n, K, 'kv_heads') for n in ('k', 'v')]
    if stack_pays(x_BxD, 2 * K * self.cfg.head_dim):
      y_Bx2KH = matmul(x_BxD, jnp.stack(kernels, axis=1))  # [B, T, 2, K, H]
      k_BxKH, v_BxKH = (y[:, :, 0] for y in jnp.split(y_Bx2KH, 2, axis=2))  # as the MLP's gate and up
    else:
      k_BxKH, v_BxKH = (matmul(x_BxD, w_DKH) for w_DKH in kernels)
    return (self._finish(k_BxKH, x_BxD, 'k', K, 'kv_heads'), self._finish(v_BxKH, x_BxD, 'v', K, 'kv_heads'))

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array, bias_BNTS: Array | None = None,
               cache: dict[str, Array] | None = None, kv_BSD: Array | None = None,
               kv_segment_ids_BS: Array | None = None, window: Array | None = None) -> tuple[Array, dict | None]:
    """`window`: this layer's sliding window (a scalar; None: every earlier key)."""
    c = self.cfg
    N = c.num_heads
    dtype = compute_dtype(c.dtype)
    scale = (1 / math.sqrt(c.query_scale) if c.query_scale else True) if c.scale_attention else False
    q_BTNH = self._project(x_BTD, 'q', N, 'heads')
    if self.cross:
      if kv_BSD is not None:
        k_BSKH, v_BSKH = self._project_kv(kv_BSD)
        if cache is not None:
          cache = {'k': k_BSKH.transpose(0, 2, 3, 1).astype(cache['k'].dtype),  # [B, K, H, S]
                   'v': v_BSKH.transpose(0, 2, 1, 3).astype(cache['v'].dtype)}
      mask_BTS = kv_segment_ids_BS[:, None, :] == segment_ids_BT[:, :, None]
      if kv_BSD is not None:
        k_BSKH = constrain(k_BSKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))  # the whole encoder row, as above
        v_BSKH = constrain(v_BSKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))
        out_BTNH = dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, None, scale)
      else:
        out_BTNH = cached_attention(q_BTNH, *(cache[n].astype(dtype) for n in ('k', 'v')), mask_BTS, None, scale)
      # A query whose segment has no encoder tokens in the row sees none, so its cross-attention adds nothing:
      # a softmax over keys that are all masked would spread it evenly over every encoder position, other
      # examples' included (an example cut across rows would read its neighbours' inputs).
      out_BTNH = jnp.where(jnp.any(mask_BTS, axis=-1)[:, :, None, None], out_BTNH, 0).astype(out_BTNH.dtype)
    else:
      k_BTKH, v_BTKH = self._project_kv(x_BTD)
      if c.qk_norm:
        q_BTNH = Norm(c, axis='head_dim', name='q_norm')(q_BTNH)
        k_BTKH = Norm(c, axis='head_dim', name='k_norm')(k_BTKH)
      if c.position_type == 'rope':
        q_BTNH = rope(q_BTNH, positions_BT, c.rope_theta, c.rope_scaling)
        k_BTKH = rope(k_BTKH, positions_BT, c.rope_theta, c.rope_scaling)
      # Named for remat policies (transformer.REMAT_POLICIES): 'save_attention' keeps these for the backward pass.
      q_BTNH = checkpoint_name(constrain(q_BTNH, ('batch', 'seq', 'heads', 'head_dim')), 'attn_qkv')
      k_BTKH = checkpoint_name(constrain(k_BTKH, ('batch', 'seq', 'kv_heads', 'head_dim')), 'attn_qkv')
      v_BTKH = checkpoint_name(constrain(v_BTKH, ('batch', 'seq', 'kv_heads', 'head_dim')), 'attn_qkv')
      if cache is not None:
        cache = write_cache(cache, k_BTKH, v_BTKH, positions_BT)
      if cache is None or (self.prefill and bias_BNTS is None):
        # Context parallelism: queries stay split over the sequence axis while keys and values are gathered
        # whole (`kv_seq` is never split), so each device attends its block of queries to the entire row.
        # A prefill attends to its own keys, which are all the cache holds: the whole-row kernels apply.
        k_BSKH = constrain(k_BTKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))
        v_BSKH = constrain(v_BTKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))
        out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT, bias_BNTS, c, self.causal,
                          prefill=cache is not None, scale=scale, window=window)
      else:
        # A decode step's few queries against the cache: XLA's einsums (a flash kernel's tiles would be
        # almost empty). Cache slot s holds position s of its row. Every slot at or before a query's
        # position has been written by then (prompt or generated token), so position order alone is the mask.
        B = q_BTNH.shape[0]
        k_BKHS, v_BKSH = (cache[n].astype(dtype) for n in ('k', 'v'))
        S = k_BKHS.shape[3]
        slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype), (B, S))
        mask_BTS = (slots_BS[:, None, :] <= positions_BT[:, :, None]) & in_window(positions_BT, slots_BS, window)
        out_BTNH = cached_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS, bias_BNTS, scale, c.attn_logit_softcap)
    out_BTNH = checkpoint_name(out_BTNH, 'attn_out')
    # GPT-2's scaled init of residual outputs keeps the residual stream's variance flat in depth.
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    wo_NHD = _param(self, 'o', out_init, ('heads', 'head_dim', 'embed'), (N, c.head_dim, c.embed_dim),
                    c).astype(dtype)
    B, T = out_BTNH.shape[:2]  # heads and head dim as one axis: matmul contracts x's last
    out_BTD = matmul(out_BTNH.reshape(B, T, N * c.head_dim), wo_NHD.reshape(N * c.head_dim, c.embed_dim))
    delta = lora_delta(self, 'o', out_BTNH, ('heads', 'head_dim'), (N, c.head_dim), ('embed',), (c.embed_dim,), c)
    if delta is not None:
      out_BTD = out_BTD + delta
    if c.use_bias:
      out_BTD = out_BTD + _bias(self, 'o_bias', ('embed',), (c.embed_dim,), c).astype(dtype)[None, None, :]
    return out_BTD, cache


class Mlp(nn.Module):
  """The feed-forward block: act(x W_up) W_down (GPT-2, BERT, T5), or with `mlp_gated`
  act(x W_gate) * (x W_up), then W_down (SwiGLU in LLaMA, GEGLU in T5 v1.1; Shazeer 2020)."""
  cfg: Any

  def _kernel(self, name: str, names: tuple[str, str], shape: tuple[int, int], init) -> Array:
    return _param(self, name, init, names, shape, self.cfg).astype(compute_dtype(self.cfg.dtype))

  def _finish(self, y: Array, x: Array, name: str, names: tuple[str, str], shape: tuple[int, int]) -> Array:
    """x W (already in y) plus the projection's LoRA delta and bias, where it has them."""
    c = self.cfg
    delta = lora_delta(self, name, x, names[:1], shape[:1], names[1:], shape[1:], c)
    if delta is not None:
      y = y + delta
    if c.use_bias:
      y = y + leading(_bias(self, f'{name}_bias', names[1:], shape[1:], c).astype(y.dtype), y.ndim)
    return y

  def _dense(self, x: Array, name: str, names: tuple[str, str], shape: tuple[int, int], init) -> Array:
    y = matmul(x, self._kernel(name, names, shape, init))  # x W; its weight gradient: matmul.py
    return self._finish(y, x, name, names, shape)

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.cfg
    D, F = c.embed_dim, c.mlp_dim
    init = nn.initializers.normal(c.init_std)
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    act = ACTIVATIONS[c.mlp_activation]
    names = ('embed', 'mlp')
    if c.mlp_gated:
      # Gate and up in one matmul over their kernels stacked [D, 2, F]: x is read once and the matmul is
      # twice as wide (on 2 CPU cores the MLP's forward and backward took 20% less: BENCHMARKS.md). The
      # parameters stay two, as checkpoints, converters and LoRA targets name them.
      # Stacking copies both kernels at every call: worth it for a batch of rows at least as large as they
      # are (training, evaluation), not for a decode step's or a short prefill's few rows (stack_pays).
      kernels = [self._kernel(n, names, (D, F), init) for n in ('gate', 'up')]
      if stack_pays(x_BTD, 2 * F):
        y_BT2F = matmul(x_BTD, jnp.stack(kernels, axis=1))  # [B, T, 2, F]
        # A split, not two slices: its gradient is one concatenation rather than each half padded and added.
        gate_BTF, up_BTF = (y[:, :, 0] for y in jnp.split(y_BT2F, 2, axis=2))
      else:
        gate_BTF, up_BTF = (matmul(x_BTD, w_DF) for w_DF in kernels)
      h_BTF = act(self._finish(gate_BTF, x_BTD, 'gate', names, (D, F)))
      h_BTF = h_BTF * self._finish(up_BTF, x_BTD, 'up', names, (D, F))
    else:
      h_BTF = act(self._dense(x_BTD, 'up', names, (D, F), init))
    h_BTF = constrain(h_BTF, ('batch', 'seq', 'mlp'))
    return self._dense(h_BTF, 'down', ('mlp', 'embed'), (F, D), out_init)
