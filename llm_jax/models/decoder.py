"""The decoder-only language model, in the layouts of LLaMA (pre-norm RMSNorm, rotary, grouped-query
attention, SwiGLU, untied output) and GPT-2 (pre-norm LayerNorm with biases, learned positions, GELU MLP,
tied embeddings), chosen by config keys (the tiny and gpt2_124m recipes).

Einsum letters as in layers.py. The API is pure: `model.init(rng, tokens, positions, segment_ids)` and
`model.apply({'params': p}, tokens, positions, segment_ids, cache=None)` -> (logits_BTV, cache). The KV cache
is an explicit pytree that goes in and comes back out: {'k' [L, B, K, H, S], 'v' [L, B, K, S, H]} with scanned
layers, a list of each layer's {'k' [B, K, H, S], 'v' [B, K, S, H]} unrolled (transformer.init_layer_caches).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from llm_jax.models.layers import Norm
from llm_jax.models.transformer import CACHE_AXES, embed, init_layer_caches, logits, project, run_layers

Array = jax.Array

__all__ = ['CACHE_AXES', 'Decoder', 'init_cache', 'project']


class Decoder(nn.Module):
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array, segment_ids_BT: Array,
               cache: dict[str, Array] | None = None, return_hidden: bool = False, prefill: bool = False):
    """-> (logits_BTV, cache); with `return_hidden`, ((final hidden states x_BTD, unembedding w_DV), cache)
    for a loss computed chunk by chunk (train/loss.py). `prefill`: the cache is empty and the rows start at
    position 0 (decode.py's prefill), so attention runs over the rows with the training kernel."""
    c = self.cfg
    x_BTD, embedding_VD = embed(self, c, tokens_BT, positions_BT)
    x_BTD, cache = run_layers(self, c, x_BTD, positions_BT, segment_ids_BT, name='layers',
                              num_layers=c.num_layers, causal=True, deterministic=self.deterministic, cache=cache,
                              prefill=prefill)
    if c.norm_position == 'pre':
      x_BTD = Norm(c, name='final_norm')(x_BTD)
    return logits(self, c, x_BTD, embedding_VD, return_hidden=return_hidden), cache


def init_cache(cfg, batch: int, max_len: int) -> dict[str, Array] | list[dict[str, Array]]:
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return init_layer_caches(cfg, cfg.num_layers, {'k': shape, 'v': shape})
