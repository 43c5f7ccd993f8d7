"""The decoder-only language model (LLaMA layout: pre-norm RMSNorm, rotary, grouped-query attention, SwiGLU).

Einsum letters as in layers.py. The API is pure: `model.init(rng, tokens, positions, segment_ids)` and
`model.apply({'params': p}, tokens, positions, segment_ids, cache=None)` -> (logits_BTV, cache). The KV cache
is an explicit pytree {'k', 'v'} of [L, B, S, K, H] arrays that goes in and comes back out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.layers import Attention, RMSNorm, SwiGLU, _param, compute_dtype
from llm_jax.sharding import constrain

Array = jax.Array

CACHE_AXES = ('layers', 'batch', 'cache_seq', 'kv_heads', 'head_dim')

# What each block keeps for the backward pass; everything else is recomputed there. The loss (and so the
# gradients) is the same whatever the policy; only memory and time change.
REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    # Save the weight matmuls' outputs, recompute attention scores and elementwise ops.
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save the attention inputs (q, k, v after rotary) and output (layers.Attention names them): the
    # backward pass recomputes only norms, the MLP and the attention softmax.
    'save_attention': jax.checkpoint_policies.save_only_these_names('attn_qkv', 'attn_out'),
}


class Block(nn.Module):
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict | None]:
    c = self.cfg
    h_BTD = RMSNorm(c, name='attn_norm')(x_BTD)
    a_BTD, cache = Attention(c, name='attn')(h_BTD, positions_BT, segment_ids_BT, cache)
    x_BTD = x_BTD + nn.Dropout(c.dropout_rate)(a_BTD, deterministic=self.deterministic)
    h_BTD = RMSNorm(c, name='mlp_norm')(x_BTD)
    m_BTD = SwiGLU(c, name='mlp')(h_BTD)
    x_BTD = x_BTD + nn.Dropout(c.dropout_rate)(m_BTD, deterministic=self.deterministic)
    return constrain(x_BTD, ('batch', 'seq', 'embed')), cache


def _block_class(cfg):
  if cfg.remat == 'none':
    return Block
  # Under scan, XLA cannot CSE across iterations anyway; outside it, prevent_cse keeps remat honest.
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array, segment_ids_BT: Array,
               cache: dict[str, Array] | None = None, return_hidden: bool = False):
    """-> (logits_BTV, cache); with `return_hidden`, ((final hidden states x_BTD, unembedding w_DV), cache)
    so that a loss can project chunk by chunk and never hold the logits of the whole batch (train/loss.py)."""
    c = self.cfg
    V, D, L = c.vocab_size, c.embed_dim, c.num_layers
    dtype = compute_dtype(c.dtype)
    embedding_VD = _param(self, 'embedding', nn.initializers.normal(c.init_std), ('vocab', 'embed'),
                          (V, D), c)
    # Gathered over the FSDP axes first, as FSDP does for every weight before use: the lookup is then local
    # to each vocabulary shard, where GSPMD would otherwise replicate the looked-up rows to reshard them.
    table_VD = constrain(embedding_VD, ('vocab', None))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)
    x_BTD = constrain(x_BTD, ('batch', 'seq', 'embed'))

    block = _block_class(c)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=L,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, cache = stack(c, self.deterministic, name='layers')(x_BTD, positions_BT, segment_ids_BT, cache)
    else:
      new_cache = []
      for i in range(L):
        layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
        x_BTD, layer_cache = block(c, self.deterministic, name=f'layers_{i}')(
            x_BTD, positions_BT, segment_ids_BT, layer_cache)
        new_cache.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *a: jnp.stack(a), *new_cache)

    x_BTD = RMSNorm(c, name='final_norm')(x_BTD)
    if c.tie_embeddings:
      unembed_DV = embedding_VD.T
    else:
      unembed_DV = _param(self, 'unembed', nn.initializers.normal(c.init_std), ('embed', 'vocab'), (D, V), c)
    unembed_DV = unembed_DV.astype(dtype)
    if return_hidden:
      return (x_BTD, unembed_DV), cache
    return project(x_BTD, unembed_DV, jnp.dtype(c.logits_dtype)), cache


def project(x_BTD: Array, unembed_DV: Array, logits_dtype) -> Array:
  """Logits in `logits_dtype`, accumulated in it too (a float32 result of bfloat16 inputs is exact where a
  bfloat16 result cast up is not)."""
  logits_BTV = jnp.einsum('BTD,DV->BTV', x_BTD, unembed_DV, preferred_element_type=logits_dtype)
  return constrain(logits_BTV, ('batch', 'seq', 'vocab'))


def init_cache(cfg, batch: int, max_len: int) -> dict[str, Array]:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = compute_dtype(cfg.dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
