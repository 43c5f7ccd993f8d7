"""The encoder-decoder model (T5, Raffel et al. 2020): a bidirectional encoder over the corrupted input and
a causal decoder that also attends to the encoder's output, sharing one token embedding; pre-norm RMSNorm,
no biases, T5's relative-position buckets (one table per stack, shared by its layers), unscaled attention
logits, a ReLU or gated-GELU MLP, and an output tied to the embedding (hidden states scaled by
embed_dim ** -0.5 first, as T5 does) or separate. The t5_small recipe.

Letters as in layers.py; S is the encoder's length, T the decoder's.

    model.apply({'params': p}, inputs_BS, positions_BS, segment_ids_BS,
                decoder_inputs_BT, decoder_positions_BT, decoder_segment_ids_BT, cache=None)
        -> (logits_BTV, cache)

Packed rows work as for the other families: a decoder token attends to its own target's earlier tokens and
to the encoder tokens of the same segment. Decoding (infer/decode.py's EncoderDecoder adapter) calls it twice:
once with a cache, which encodes the prompt, fills every layer's cross-attention keys and values and
decodes the start token; then with `step=True` per new token, which skips the encoder (its arguments may be
None) and reads the cache: `layers`, each decoder layer's {'k', 'v'} [B, K, T, H] of its own keys and
values and {'ck', 'cv'} [B, K, S, H] of the encoder's, keys stored with their last two axes swapped
(stacked on a leading L axis with scanned layers: transformer.init_layer_caches), and `encoder_segment_ids`
[B, S], which marks the prompt's padding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.layers import Norm
from llm_jax.models.transformer import CACHE_AXES, embed, init_layer_caches, logits, run_layers

Array = jax.Array

__all__ = ['CACHE_AXES', 'EncoderDecoder', 'init_cache']



class EncoderDecoder(nn.Module):
  cfg: Any
  deterministic: bool = True

  def decoder_layers(self) -> int:
    return self.cfg.num_decoder_layers or self.cfg.num_layers

  @nn.compact
  def __call__(self, inputs_BS: Array | None, positions_BS: Array | None, segment_ids_BS: Array | None,
               decoder_inputs_BT: Array, decoder_positions_BT: Array, decoder_segment_ids_BT: Array,
               cache: dict[str, Array] | None = None, step: bool = False, return_hidden: bool = False):
    c = self.cfg
    encoded_BSD = embedding_VD = None
    if not step:
      x_BSD, embedding_VD = embed(self, c, inputs_BS, positions_BS, prefix='encoder_')
      x_BSD, _ = run_layers(self, c, x_BSD, positions_BS, segment_ids_BS, name='encoder_layers',
                            num_layers=c.num_layers, causal=False, deterministic=self.deterministic)
      encoded_BSD = Norm(c, name='encoder_final_norm')(x_BSD) if c.norm_position == 'pre' else x_BSD
    if cache is not None and not step:
      cache = {**cache, 'encoder_segment_ids': segment_ids_BS.astype(cache['encoder_segment_ids'].dtype)}
    encoded_segment_ids_BS = segment_ids_BS if cache is None else cache['encoder_segment_ids']
    layer_cache = None if cache is None else cache['layers']

    y_BTD, embedding_VD = embed(self, c, decoder_inputs_BT, decoder_positions_BT, embedding_VD,
                                prefix='decoder_')
    y_BTD, layer_cache = run_layers(
        self, c, y_BTD, decoder_positions_BT, decoder_segment_ids_BT, name='decoder_layers',
        num_layers=self.decoder_layers(), causal=True, deterministic=self.deterministic, cross=True,
        encoded_BSD=encoded_BSD, encoded_segment_ids_BS=encoded_segment_ids_BS, cache=layer_cache)
    if c.norm_position == 'pre':
      y_BTD = Norm(c, name='decoder_final_norm')(y_BTD)
    if c.tie_embeddings:  # T5 (and Mesh TensorFlow) rescale before a tied output layer
      y_BTD = y_BTD * (c.embed_dim ** -0.5)
    if cache is not None:
      cache = {**cache, 'layers': layer_cache}
    return logits(self, c, y_BTD, embedding_VD, return_hidden=return_hidden), cache


def init_cache(cfg, batch: int, encoder_len: int, decoder_len: int) -> dict:
  self_shape = (batch, cfg.num_kv_heads, decoder_len, cfg.head_dim)
  cross_shape = (batch, cfg.num_kv_heads, encoder_len, cfg.head_dim)
  layers = init_layer_caches(cfg, cfg.num_decoder_layers or cfg.num_layers,
                             {'k': self_shape, 'v': self_shape, 'ck': cross_shape, 'cv': cross_shape})
  return {'layers': layers, 'encoder_segment_ids': jnp.zeros((batch, encoder_len), jnp.int32)}
