"""The encoder-only masked language model (BERT, Devlin et al. 2019): bidirectional attention within each
packed document, post-norm LayerNorm layers with biases, learned positions and a masked-LM head (a dense
layer, the activation, a LayerNorm, then the tied embedding plus an output bias). The bert_base recipe.

Letters as in layers.py. `model.apply({'params': p}, tokens, positions, segment_ids)` -> (logits_BTV, None),
the same call as the decoder's, so training, evaluation and sharding treat both alike; with
`hidden_only=True` it returns the final hidden states x_BTD instead (BERT's `last_hidden_state`, what
sentence embeddings are pooled from).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from llm_jax.models.layers import ACTIVATIONS, Norm, _bias, _param
from llm_jax.models.transformer import embed, logits, run_layers
from llm_jax.sharding import constrain

Array = jax.Array


class Encoder(nn.Module):
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array, segment_ids_BT: Array, cache: None = None,
               hidden_only: bool = False, return_hidden: bool = False):
    c = self.cfg
    x_BTD, embedding_VD = embed(self, c, tokens_BT, positions_BT)
    x_BTD, _ = run_layers(self, c, x_BTD, positions_BT, segment_ids_BT, name='layers', num_layers=c.num_layers,
                          causal=False, deterministic=self.deterministic)
    if c.norm_position == 'pre':
      x_BTD = Norm(c, name='final_norm')(x_BTD)
    if hidden_only:
      return x_BTD
    # The masked-LM head's transform: D -> D ('mlp' names its output axis: one logical name may not appear
    # twice in a parameter's sharding).
    h_BTD = x_BTD @ _param(self, 'head_dense', nn.initializers.normal(c.init_std), ('embed', 'mlp'),
                           (c.embed_dim, c.embed_dim), c).astype(x_BTD.dtype)
    if c.use_bias:
      h_BTD = h_BTD + _bias(self, 'head_dense_bias', ('mlp',), (c.embed_dim,), c).astype(x_BTD.dtype)[None, None, :]
    h_BTD = Norm(c, name='head_norm')(ACTIVATIONS[c.mlp_activation](constrain(h_BTD, ('batch', 'seq', 'mlp'))))
    return logits(self, c, h_BTD, embedding_VD, output_bias=c.use_bias, return_hidden=return_hidden), None

