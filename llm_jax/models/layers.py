"""Blocks shared by the model families: RMSNorm, rotary positions, attention with a KV cache, SwiGLU MLP.

Einsum letters: B batch, T query length, S key length, D embed, N query heads, K kv heads, G query heads per
kv head (N = K * G), H head dim, F mlp, V vocab, L layers.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); activations are pinned at block
boundaries with `sharding.constrain`. Nothing here names a mesh axis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.sharding import constrain

Array = jax.Array

# A large finite negative rather than -inf: a fully masked row (a padding query) then gives a uniform
# distribution instead of NaNs that would leak into gradients through 0 * NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def compute_dtype(name: str) -> jnp.dtype:
  """`model.dtype` as a dtype: 'auto' is bfloat16 on accelerators (their matmul units run it at full rate,
  float32 master weights keep the updates exact) and float32 on CPU, where bfloat16 matmuls are slower."""
  if name == 'auto':
    return jnp.dtype(jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, names: tuple[str, ...], shape: tuple[int, ...], cfg) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    scale_D = _param(self, 'scale', nn.initializers.ones, ('embed',), (x_BTD.shape[-1],), self.cfg)
    x32 = x_BTD.astype(jnp.float32)
    # Statistics in float32 whatever the compute dtype: bf16 sums of squares lose the small components.
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale_D.astype(jnp.float32)).astype(compute_dtype(self.cfg.dtype))


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary positions (Su et al. 2021), rotating the two halves of the head dim (the LLaMA layout that
  Hugging Face checkpoints use, so their weights load without permutation)."""
  half = x_BTNH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_mask(q_pos_BT: Array, q_seg_BT: Array, k_pos_BS: Array, k_seg_BS: Array) -> Array:
  """A query sees keys of its own segment at positions not after its own: causal within documents.

  Packed rows restart positions at each document, so comparing positions is causal only together with
  the segment check; padding (segment 0) only ever sees padding.
  """
  causal = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
  same_doc = k_seg_BS[:, None, :] == q_seg_BT[:, :, None]
  return causal & same_doc


def dot_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array) -> Array:
  """Grouped-query attention: G = N // K query heads share each kv head; softmax in float32."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / math.sqrt(H)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def write_cache(cache: dict[str, Array], k_BTKH: Array, v_BTKH: Array, positions_BT: Array) -> dict:
  """Store new keys and values at each row's own positions (rows of a batch may be at different steps)."""
  rows_B1 = jnp.arange(k_BTKH.shape[0])[:, None]
  return {
      'k': cache['k'].at[rows_B1, positions_BT].set(k_BTKH.astype(cache['k'].dtype), mode='drop'),
      'v': cache['v'].at[rows_B1, positions_BT].set(v_BTKH.astype(cache['v'].dtype), mode='drop'),
  }


class Attention(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict | None]:
    c = self.cfg
    D, N, K, H = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    dtype = compute_dtype(c.dtype)
    init = nn.initializers.normal(c.init_std)
    # GPT-2's scaled init of residual outputs keeps the residual stream's variance flat in depth.
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    wq_DNH = _param(self, 'q', init, ('embed', 'heads', 'head_dim'), (D, N, H), c).astype(dtype)
    wk_DKH = _param(self, 'k', init, ('embed', 'kv_heads', 'head_dim'), (D, K, H), c).astype(dtype)
    wv_DKH = _param(self, 'v', init, ('embed', 'kv_heads', 'head_dim'), (D, K, H), c).astype(dtype)
    wo_NHD = _param(self, 'o', out_init, ('heads', 'head_dim', 'embed'), (N, H, D), c).astype(dtype)

    q_BTNH = rope(jnp.einsum('BTD,DNH->BTNH', x_BTD, wq_DNH), positions_BT, c.rope_theta)
    k_BTKH = rope(jnp.einsum('BTD,DKH->BTKH', x_BTD, wk_DKH), positions_BT, c.rope_theta)
    v_BTKH = jnp.einsum('BTD,DKH->BTKH', x_BTD, wv_DKH)
    # Named for remat policies (decoder.REMAT_POLICIES): 'save_attention' keeps these for the backward pass.
    q_BTNH = checkpoint_name(constrain(q_BTNH, ('batch', 'seq', 'heads', 'head_dim')), 'attn_qkv')
    k_BTKH = checkpoint_name(constrain(k_BTKH, ('batch', 'seq', 'kv_heads', 'head_dim')), 'attn_qkv')
    v_BTKH = checkpoint_name(constrain(v_BTKH, ('batch', 'seq', 'kv_heads', 'head_dim')), 'attn_qkv')

    if cache is None:
      # Context parallelism: queries stay split over the sequence axis while keys and values are gathered
      # whole (`kv_seq` is never split), so each device attends its block of queries to the entire row.
      k_BSKH = constrain(k_BTKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))
      v_BSKH = constrain(v_BTKH, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))
      mask_BTS = attention_mask(positions_BT, segment_ids_BT, positions_BT, segment_ids_BT)
      out_BTNH = dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    else:
      # Cache slot s holds position s of its row. Every slot at or before a query's position has been
      # written by then (prompt or generated token), so position order alone is the mask.
      cache = write_cache(cache, k_BTKH, v_BTKH, positions_BT)
      B, S = cache['k'].shape[:2]
      slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype), (B, S))
      mask_BTS = slots_BS[:, None, :] <= positions_BT[:, :, None]
      out_BTNH = dot_attention(q_BTNH, cache['k'].astype(dtype), cache['v'].astype(dtype), mask_BTS)
    out_BTNH = checkpoint_name(out_BTNH, 'attn_out')
    out_BTD = jnp.einsum('BTNH,NHD->BTD', out_BTNH, wo_NHD)
    return out_BTD, cache


class SwiGLU(nn.Module):
  """The gated MLP of PaLM / LLaMA (Shazeer 2020): silu(x W_gate) * (x W_up), then W_down."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.cfg
    D, F = c.embed_dim, c.mlp_dim
    dtype = compute_dtype(c.dtype)
    init = nn.initializers.normal(c.init_std)
    out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    w_gate_DF = _param(self, 'gate', init, ('embed', 'mlp'), (D, F), c).astype(dtype)
    w_up_DF = _param(self, 'up', init, ('embed', 'mlp'), (D, F), c).astype(dtype)
    w_down_FD = _param(self, 'down', out_init, ('mlp', 'embed'), (F, D), c).astype(dtype)
    gate_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, w_gate_DF)
    up_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, w_up_DF)
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'seq', 'mlp'))
    return jnp.einsum('BTF,FD->BTD', h_BTF, w_down_FD)
