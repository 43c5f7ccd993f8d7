"""What every family is assembled from: the input embedding, the stack of layers, the output projection.

Letters as in layers.py. The helpers take the calling module (`parent`) and create their parameters and
submodules under it, so a family's parameter tree stays flat: `embedding`, `layers` (stacked on a leading
'layers' axis when scanned), `final_norm`, `unembed`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention import softcap
from llm_jax.models.layers import Attention, Mlp, Norm, _bias, _param, compute_dtype, leading, relative_bias
from llm_jax.models.matmul import matmul
from llm_jax.sharding import constrain

Array = jax.Array

# A cache's values are [B, K, S, H] and its keys [B, K, H, S] (attention.cached_attention): a decode step's
# q.k is then a plain matmul over each (row, kv head), q [G, H] by keys [H, S], where keys stored [S, H] had
# XLA's CPU backend contract both operands' last axes, 2.2x slower at 16 rows (the step's largest op after the
# output layer) and no faster at one (BENCHMARKS.md).
CACHE_AXES = ('layers', 'batch', 'kv_heads', 'cache_seq', 'head_dim')  # the values'
KEY_CACHE_AXES = ('layers', 'batch', 'kv_heads', 'head_dim', 'cache_seq')
KEY_CACHES = frozenset({'k', 'ck'})  # the arrays of keys: self-attention's and cross-attention's


def init_layer_caches(cfg, num_layers: int, arrays: dict[str, tuple]) -> dict[str, Array] | list[dict[str, Array]]:
  """Every layer's KV cache, zeros: `arrays` names each array's (B, K, S, H) shape (keys are stored transposed,
  [B, K, H, S]: KEY_CACHES). Scanned layers take one dict of arrays stacked on a leading layers axis (nn.scan
  slices a layer's out per iteration); unrolled layers a list with each layer's own dict, so every array is a
  buffer of its own: from a stacked cache, XLA's CPU backend read each layer's keys and values through a copy
  of its slice at every decode step (its library fusions take whole buffers), two copies per layer."""
  dtype = compute_dtype(cfg.dtype)
  arrays = {n: (B, K, H, S) if n in KEY_CACHES else (B, K, S, H) for n, (B, K, S, H) in arrays.items()}
  if cfg.scan_layers:
    return {n: jnp.zeros((num_layers, *shape), dtype) for n, shape in arrays.items()}
  return [{n: jnp.zeros(shape, dtype) for n, shape in arrays.items()} for _ in range(num_layers)]


def cache_axes(name: str, a: Array) -> tuple[str, ...]:
  """The logical axes of the cache's array `name`: [layers, B, K, S, H] stacked, [B, K, S, H] a layer's own
  (keys [.., H, S]), [B, S] the encoder's segment ids (encdec)."""
  if a.ndim == 2:
    return ('batch', 'cache_seq')
  axes = KEY_CACHE_AXES if name in KEY_CACHES else CACHE_AXES
  return axes if a.ndim == 5 else axes[1:]


def cache_rows_axis(a: Array) -> int:
  """Which axis of a cache array holds the batch's rows (decode slots, beams): the same in every array."""
  return 1 if a.ndim == 5 else 0


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
  """One layer: self-attention, cross-attention (`cross`, T5's decoder), MLP; each a residual branch with
  dropout. Pre-norm normalises each branch's input (LLaMA, GPT-2, T5); post-norm normalises after each
  residual add (BERT). With `post_norms` each branch's output is normed too before the add (Gemma 2).

  The cache holds this layer's self-attention `k`, `v` and, with `cross`, the encoder's `ck`, `cv`.
  """
  cfg: Any
  causal: bool = True
  cross: bool = False
  deterministic: bool = True
  prefill: bool = False  # decode's prefill: self-attention over the row itself (layers.Attention)

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array, bias_BNTS: Array | None,
               encoded_BSD: Array | None, encoded_segment_ids_BS: Array | None, window: Array | None,
               cache: dict[str, Array] | None) -> tuple[Array, dict | None]:
    c = self.cfg
    pre = c.norm_position == 'pre'

    def residual(name: str, x_BTD: Array, sublayer):
      y_BTD, aux = sublayer(Norm(c, name=f'{name}_norm')(x_BTD) if pre else x_BTD)
      if c.post_norms:
        y_BTD = Norm(c, name=f'{name}_post_norm')(y_BTD)
      x_BTD = x_BTD + nn.Dropout(c.dropout_rate)(y_BTD, deterministic=self.deterministic)
      return (x_BTD if pre else Norm(c, name=f'{name}_norm')(x_BTD)), aux

    self_cache = None if cache is None else {'k': cache['k'], 'v': cache['v']}
    attn = Attention(c, causal=self.causal, prefill=self.prefill, name='attn')
    x_BTD, self_cache = residual('attn', x_BTD, lambda h: attn(h, positions_BT, segment_ids_BT, bias_BNTS,
                                                               self_cache, window=window))
    new_cache = self_cache
    if self.cross:
      cross_cache = None if cache is None else {'k': cache['ck'], 'v': cache['cv']}
      cross = Attention(c, cross=True, name='cross_attn')
      x_BTD, cross_cache = residual('cross', x_BTD, lambda h: cross(
          h, positions_BT, segment_ids_BT, None, cross_cache, encoded_BSD, encoded_segment_ids_BS))
      if cache is not None:
        new_cache = {**self_cache, 'ck': cross_cache['k'], 'cv': cross_cache['v']}
    mlp = Mlp(c, name='mlp')
    x_BTD, _ = residual('mlp', x_BTD, lambda h: (mlp(h), None))
    return constrain(x_BTD, ('batch', 'seq', 'embed')), new_cache


def _block_class(cfg):
  if cfg.remat == 'none':
    return Block
  # Under scan, XLA cannot CSE across iterations anyway; outside it, prevent_cse keeps remat honest.
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def layer_windows(cfg, num_layers: int) -> list[int]:
  """Each layer's sliding window (0: it sees every earlier key): `sliding_window` on every layer, or with
  `global_every` on all but every global_every-th (Gemma 2 alternates local and global, local first)."""
  w, every = cfg.sliding_window, cfg.global_every
  return [0 if not w or (every and (i + 1) % every == 0) else w for i in range(num_layers)]


def _windows(cfg, num_layers: int) -> Array | None:
  """`layer_windows` as an int32 array the layer stack scans over (a global layer's window is past any row)."""
  if not cfg.sliding_window:
    return None
  return jnp.asarray([w or jnp.iinfo(jnp.int32).max for w in layer_windows(cfg, num_layers)], jnp.int32)


def run_layers(parent: nn.Module, cfg, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array, *,
               name: str, num_layers: int, causal: bool, deterministic: bool, cross: bool = False,
               encoded_BSD: Array | None = None, encoded_segment_ids_BS: Array | None = None,
               cache: dict | list | None = None, prefill: bool = False) -> tuple[Array, dict | list | None]:
  """`num_layers` blocks under `parent.<name>`: scanned (one compiled layer, parameters stacked on a
  leading 'layers' axis) or unrolled (`<name>_0`, `<name>_1`, ...). With relative positions, the bias is
  computed once here from `<name>_rel_bias` and shared by every layer, as in T5. `prefill`: the cache is
empty and every row starts at position 0, so self-attention may run over the rows alone."""
  bias_BNTS = None
  if cfg.position_type == 'relative':
    if cache is None:  # packed rows: within a segment, key - query position is the index difference
      T = x_BTD.shape[1]
      q_pos_BT = k_pos_BS = jnp.arange(T, dtype=jnp.int32)[None]
    else:  # decoding: each row's query position against every cache slot
      q_pos_BT = positions_BT
      k = cache[0]['k'] if isinstance(cache, list) else cache['k']  # a layer's own, or stacked
      S = k.shape[-1]  # keys are [.., H, S]
      k_pos_BS = jnp.arange(S, dtype=jnp.int32)[None]
    bias_BNTS = relative_bias(parent, cfg, f'{name}_rel_bias', q_pos_BT, k_pos_BS, bidirectional=not causal)

  block = _block_class(cfg)
  args = (positions_BT, segment_ids_BT, bias_BNTS, encoded_BSD, encoded_segment_ids_BS)
  windows_L = _windows(cfg, num_layers)
  if cfg.scan_layers:
    stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast,) * len(args) + (0, 0), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    return stack(cfg, causal, cross, deterministic, prefill, name=name, parent=parent)(x_BTD, *args, windows_L,
                                                                                        cache)
  # Unrolled, each layer reads and writes its own cache (init_layer_caches).
  new_caches = []
  for i in range(num_layers):
    window = None if windows_L is None else windows_L[i]
    x_BTD, layer_cache = block(cfg, causal, cross, deterministic, prefill, name=f'{name}_{i}', parent=parent)(
        x_BTD, *args, window, None if cache is None else cache[i])
    new_caches.append(layer_cache)
  return x_BTD, None if cache is None else new_caches


def position_rows(cfg) -> int | None:
  """How many positions the model can look up: the rows of a learned table (GPT-2, BERT), or None where any
  position has an embedding (rotary, relative). Whatever pads a batch must number its padding below this:
  a position past the table embeds as NaN (jnp.take's fill), and a masked key still carries NaN into the
  attention sum of every query of its row (0 * NaN)."""
  return cfg.max_positions if cfg.position_type == 'learned' else None


def embed(parent: nn.Module, cfg, tokens_BT: Array, positions_BT: Array, embedding_VD: Array | None = None,
          prefix: str = '') -> tuple[Array, Array]:
  """(x_BTD, embedding_VD): token embeddings (times sqrt(embed_dim) with `embed_scale`, Gemma), plus learned
  positions (GPT-2, BERT) and BERT's token type 0, normalised when the model is post-norm (BERT's embedding
  LayerNorm). A second stack sharing the token
  table (T5's decoder) passes it in and a `prefix` for its own position table and norm."""
  c = cfg
  dtype = compute_dtype(c.dtype)
  init = nn.initializers.normal(c.init_std)
  if embedding_VD is None:
    embedding_VD = _param(parent, 'embedding', init, ('vocab', 'embed'), (c.vocab_size, c.embed_dim), c)
  # Gathered over the FSDP axes first, as FSDP does for every weight before use: the lookup is then local
  # to each vocabulary shard, where GSPMD would otherwise replicate the looked-up rows to reshard them.
  x_BTD = jnp.take(constrain(embedding_VD, ('vocab', None)), tokens_BT, axis=0).astype(dtype)
  if c.embed_scale:  # the factor rounded to the compute dtype first, as Gemma's reference does
    x_BTD = x_BTD * jnp.asarray(c.embed_dim ** 0.5, dtype)
  if c.position_type == 'learned':
    table_PD = _param(parent, f'{prefix}pos_embedding', init, ('table', 'embed'), (c.max_positions, c.embed_dim),
                      c)
    x_BTD = x_BTD + jnp.take(table_PD, positions_BT, axis=0).astype(dtype)
  if c.type_vocab_size:
    types_YD = _param(parent, f'{prefix}type_embedding', init, ('table', 'embed'),
                      (c.type_vocab_size, c.embed_dim), c)
    x_BTD = x_BTD + types_YD[0].astype(dtype)[None, None, :]
  if c.norm_position == 'post':
    x_BTD = Norm(c, name=f'{prefix}embed_norm', parent=parent)(x_BTD)
  return constrain(x_BTD, ('batch', 'seq', 'embed')), embedding_VD


def logits(parent: nn.Module, cfg, x_BTD: Array, embedding_VD: Array, output_bias: bool = False,
           return_hidden: bool = False):
  """logits_BTV in model.logits_dtype: the tied embedding (x @ E^T) or a separate `unembed`, plus BERT's output
  bias. With `return_hidden`, (x_BTD, unembed_DV) instead, so that a loss can project chunk by chunk and
  never hold the logits of the whole batch (train/loss.py; not with an output bias: config/validate.py refuses it)."""
  c = cfg
  dtype = compute_dtype(c.dtype)
  if c.tie_embeddings:
    unembed_DV = embedding_VD.T
  else:
    unembed_DV = _param(parent, 'unembed', nn.initializers.normal(c.init_std), ('embed', 'vocab'),
                        (c.embed_dim, c.vocab_size), c)
  unembed_DV = unembed_DV.astype(dtype)
  bias_V = _bias(parent, 'unembed_bias', ('vocab',), (c.vocab_size,), c) if output_bias else None
  if return_hidden:
    return x_BTD, unembed_DV
  logits_BTV = project(x_BTD, unembed_DV, jnp.dtype(c.logits_dtype), c.final_logit_softcap)
  if bias_V is not None:
    logits_BTV = logits_BTV + leading(bias_V.astype(logits_BTV.dtype), logits_BTV.ndim)
  return logits_BTV


def project(x_BTD: Array, unembed_DV: Array, logits_dtype, cap: float = 0.0) -> Array:
  """Logits in `logits_dtype`, accumulated in it too (a float32 result of bfloat16 inputs is exact where a
  bfloat16 result cast up is not); soft-capped at `cap` (model.final_logit_softcap, Gemma 2; 0: not)."""
  logits_BTV = softcap(matmul(x_BTD, unembed_DV, logits_dtype), cap)  # its weight gradient: matmul.py
  return constrain(logits_BTV, ('batch', 'seq', 'vocab'))
