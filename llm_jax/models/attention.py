"""Attention over given queries, keys and values: the document and causal masks, the XLA reference
(dot_attention, which every kernel is tested against), cuDNN's fused call, and `attend`, which runs the one
`model.attention_impl` chooses (attention_kernels.py holds the registry and the Pallas kernels). Letters as in
layers.py, whose Attention module projects the heads and keeps the KV cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError
from llm_jax.models import attention_kernels as kernels

Array = jax.Array

# A large finite negative rather than -inf: a fully masked row (a padding query) then gives a uniform
# distribution instead of NaNs that would leak into gradients through 0 * NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

ATTENTION_IMPLS = ('auto',) + tuple(kernels.IMPLS)  # attend() below


def attention_mask(q_pos_BT: Array, q_seg_BT: Array, k_pos_BS: Array, k_seg_BS: Array,
                   causal: bool = True, window: Array | None = None) -> Array:
  """A query sees keys of its own segment (document), and with `causal` only those not after it; with a
  `window` (sliding-window attention) only those less than `window` positions back.

  Packed rows restart positions at each document, so comparing positions is causal only together with
  the segment check; padding (segment 0) only ever sees padding.
  """
  same_doc = k_seg_BS[:, None, :] == q_seg_BT[:, :, None]
  if not causal:
    return same_doc
  return same_doc & (k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]) & in_window(q_pos_BT, k_pos_BS, window)


def in_window(q_pos_BT: Array, k_pos_BS: Array, window: Array | None) -> Array:
  """Whether each key is less than `window` positions before each query (Mistral's and Gemma's sliding
  window, as transformers counts it: the query itself and window - 1 keys before it); all True without."""
  if window is None:
    return jnp.ones((), bool)
  return q_pos_BT[:, :, None] - k_pos_BS[:, None, :] < window


def logit_scale(scale: bool | float, head_dim: int) -> float:
  """What attention logits are multiplied by: True is 1 / sqrt(head_dim), False 1, a number itself."""
  if isinstance(scale, bool):
    return 1 / math.sqrt(head_dim) if scale else 1.0
  return float(scale)


def softcap(x: Array, cap: float) -> Array:
  """cap * tanh(x / cap) (Gemma 2): logits bounded to (-cap, cap), near x where |x| << cap; 0 is off."""
  return cap * jnp.tanh(x / cap) if cap else x


def dot_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, bias_BNTS: Array | None = None,
                  scale: bool | float = True, cap: float = 0.0) -> Array:
  """Grouped-query attention: G = N // K query heads share each kv head; softmax in float32. Logits are
  scaled by `logit_scale(scale)`, then soft-capped at `cap` (0: not)."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  probs_BKGTS = _probs(logits_BKGTS, mask_BTS, bias_BNTS, scale, cap, H)
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def cached_attention(q_BTNH: Array, k_BKHS: Array, v_BKSH: Array, mask_BTS: Array, bias_BNTS: Array | None = None,
                     scale: bool | float = True, cap: float = 0.0) -> Array:
  """dot_attention over a KV cache's keys [B, K, H, S] and values [B, K, S, H] (a decode step's few queries).
  Both products are then plain batched matmuls over (B, K), [G T, H] by [H, S] and [G T, S] by [S, H], that
  read the cache where it lies: from [B, S, K, H], XLA's CPU backend first copied every layer's keys and
  values into this order, and summing products over H instead (what decode steps did) ran as a slow
  reduction: the attention of four layers' 16-row step took 0.77 ms that way against 0.27 ms with both
  [B, K, S, H] (2 CPU cores, BENCHMARKS.md), and keys [S, H] made q.k contract both operands' last axes, 2.2x
  slower at 16 rows than keys [H, S]."""
  B, T, N, H = q_BTNH.shape
  K = k_BKHS.shape[1]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  logits_BKGTS = jnp.einsum('BKGTH,BKHS->BKGTS', q_BKGTH, k_BKHS, preferred_element_type=jnp.float32)
  probs_BKGTS = _probs(logits_BKGTS, mask_BTS, bias_BNTS, scale, cap, H)
  out_BKGTH = jnp.einsum('BKGTS,BKSH->BKGTH', probs_BKGTS.astype(v_BKSH.dtype), v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _probs(logits_BKGTS: Array, mask_BTS: Array, bias_BNTS: Array | None, scale: bool | float, cap: float,
           H: int) -> Array:
  """Attention weights from raw logits: scaled, soft-capped, plus the bias, masked, softmax in float32."""
  B, K, G, T, S = logits_BKGTS.shape
  if scale is not False:
    logits_BKGTS = logits_BKGTS * logit_scale(scale, H)
  logits_BKGTS = softcap(logits_BKGTS, cap)
  if bias_BNTS is not None:
    logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(bias_BNTS.shape[0], K, G, T, S).astype(jnp.float32)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  return jax.nn.softmax(logits_BKGTS, axis=-1)


def _cudnn_supported(q_BTNH: Array, k_BSKH: Array, bias_BNTS: Array | None, cap: float = 0.0) -> bool:
  """Whether cuDNN's flash attention takes these inputs: a CUDA device, half-precision inputs, a head dim that
  is a multiple of 8 up to 128 (256 on Hopper; 128 keeps the check free of device queries), an even length
  (a masked backward pass needs one), no additive bias (T5's relative positions would go in as a dense
  B N T S tensor, no faster than XLA), sequence and head dims whole on every device and query and key heads
  split alike (its partitioner refuses anything else: context parallelism stays on XLA)."""
  return (jax.default_backend() == 'gpu'
          and kernels.unsupported('cudnn', kernels.shape_of(q_BTNH, k_BSKH, bias_BNTS is not None, softcap=cap > 0), None,
                                  'gpu') is None)


def attend(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, positions_BT: Array, segment_ids_BT: Array,
           bias_BNTS: Array | None, cfg, causal: bool, prefill: bool = False, scale: bool | float = True,
           window: Array | None = None) -> Array:
  """Self-attention over a whole row (training, evaluation, prefill) by `model.attention_impl`, chosen in
  attention_kernels.choose: 'xla' is dot_attention; 'cudnn' is cuDNN's fused attention through
  `jax.nn.dot_product_attention` with the B T S document mask; 'splash' (TPU) and 'pallas_gpu' (GPU) are
  flash kernels that take the segment ids themselves; 'auto' is the platform's kernel where it applies.

  With `causal` the mask never lets a query see a later key (positions rise within a document and documents
  are contiguous), so cuDNN may skip the tiles above the diagonal (is_causal), which halves its work, and the
  Pallas kernels may compare token indices. The segments always go in.

  A `prefill` the named kernel cannot take (cuDNN and a prompt of odd length) runs on XLA: a prompt's length
  is the user's, not the config's, and XLA honours the same mask.
  """
  cap = cfg.attn_logit_softcap
  shape = kernels.shape_of(q_BTNH, k_BSKH, bias_BNTS is not None, windowed=cfg.sliding_window > 0,
                           softcap=cap > 0)
  try:
    impl = kernels.choose(cfg.attention_impl, shape, cfg, jax.default_backend())
  except UserError:
    if not prefill:
      raise
    impl = 'xla'

  if kernels.IMPLS[impl].kernel:
    factor = logit_scale(scale, q_BTNH.shape[-1]) if scale is not False else 1.0
    return kernels.run_kernel(impl, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, scale=factor,
                              model_cfg=cfg)
  mask_BTS = attention_mask(positions_BT, segment_ids_BT, positions_BT, segment_ids_BT, causal, window)
  if impl == 'xla':
    return dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale, cap)
  return fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale, impl, causal)


def fused_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, bias_BNTS: Array | None,
                    scale: bool | float, implementation: str | None, in_order: bool) -> Array:
  """`jax.nn.dot_product_attention` with our mask: the call cuDNN runs, and with implementation='xla' the
  same call on any backend (tests/test_attention_impl.py checks that equals dot_attention)."""
  H = q_BTNH.shape[-1]
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_BTS[:, None], scale=logit_scale(scale, H),
      is_causal=in_order, implementation=implementation)
