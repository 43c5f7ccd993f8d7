"""The attention kernels behind `model.attention_impl`, one record each, and the choice 'auto' makes.

  xla         dot_attention (attention.py): einsums and a float32 softmax over the whole T x S score matrix
  cudnn       cuDNN's fused attention via jax.nn.dot_product_attention, the document mask as a dense B T S
              boolean (its segment-aware packed layout is private API in JAX, so the mask carries them)
  splash      TPU: JAX's splash attention (Pallas, jax.experimental.pallas.ops.tpu.splash_attention), flash
              attention that takes the segment ids of packed documents and skips fully masked blocks
  pallas_gpu  GPU: JAX's Pallas flash attention (jax.experimental.pallas.ops.gpu.attention) with its
              `segment_ids`, no dense mask

The two Pallas kernels take segment ids and a causal flag that compares token indices, not positions: on a
packed row positions rise within each document and documents are contiguous, so index order within a
document is position order (tests/test_attention_kernels.py checks it against the XLA path on such rows).
Both run under `shard_map` over the run's mesh: batch and heads split as the einsum path splits them
(`batch`, `heads`, `kv_heads` of the logical rules), every device attends its rows and heads over the whole
sequence. They cannot split the sequence (context parallelism) or add T5's relative-position bias; 'auto'
then takes XLA, and asking for them by name is a UserError rather than a silent fallback.

`INTERPRET` (the tests set it) runs the Pallas kernels in interpret mode, so CPU tests run the real kernels.
Letters as in layers.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax import sharding
from llm_jax.errors import UserError

Array = jax.Array

INTERPRET = False

# Block sizes when model.attention_block_q / _kv are 0. Splash: 512 x 512 is what MaxText and the splash
# authors use on v4/v5e/v5p/v6e (a 512 x 512 float32 score tile plus q, k, v tiles fit every generation's
# VMEM; smaller tiles leave the MXU idle between grid steps). GPU: JAX's own defaults for the kernel.
DEFAULT_BLOCKS = {'splash': (512, 512), 'pallas_gpu': (128, 128)}
_GPU_BACKWARD_BLOCK = 32
# The unit rows are padded to: splash tiles the kv axis in 128-lane vector registers; Triton's dots want 16.
_LANES = {'splash': 128, 'pallas_gpu': 16}  # JAX's default for the GPU kernel's backward pass (shared memory bounds it)


@dataclasses.dataclass(frozen=True)
class Impl:
  name: str
  platform: str | None  # the backend it needs; None: any
  kernel: bool  # a Pallas kernel taking segment ids (True) or a path that takes the dense mask (False)
  why: str  # for the README and `llm-jax plan`
  auto: int | None = None  # 'auto' tries its platform's kernels by this rank, lowest first; None: never
  auto_dtypes: tuple = ()  # the compute dtypes 'auto' takes it for (empty: any)


_HALF = (jnp.bfloat16, jnp.float16)
IMPLS = {
    'xla': Impl('xla', None, False, 'XLA einsums, the whole score matrix per head'),
    'cudnn': Impl('cudnn', 'gpu', False, "cuDNN's fused attention, documents as a dense B T S mask", auto=1,
                  auto_dtypes=_HALF),
    'splash': Impl('splash', 'tpu', True, 'splash attention (Pallas TPU), segment ids, no score matrix', auto=0),
    'pallas_gpu': Impl('pallas_gpu', 'gpu', True, 'Pallas GPU flash attention, segment ids, no score matrix',
                       auto=0, auto_dtypes=_HALF),
}


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the choice of kernel depends on: static facts of one attention call and of the active mesh."""
  seq_len: int
  head_dim: int
  dtype: jnp.dtype
  has_bias: bool
  seq_split: int  # devices the sequence is split over (context parallelism)
  heads_alike: bool  # query and key heads split over the same devices (kernels shard them together)
  heads_divide: bool  # the local query heads are a whole number of groups of the local kv heads
  windowed: bool = False  # a sliding window (model.sliding_window): a mask the Pallas kernels do not build
  softcap: bool = False  # soft-capped logits (model.attn_logit_softcap): in no fused kernel's softmax


def blocks(name: str, model_cfg, seq_len: int) -> tuple[int, int, int]:
  """(block_q, block_kv, padded length) of kernel `name` for rows of `seq_len`: the config's blocks, else the
  default, shrunk to a short row; the row is padded to a whole number of blocks (run_kernel pads with a
  segment id of its own, so the padding sees only itself)."""
  unit = _LANES[name]
  padded = -(-seq_len // unit) * unit
  bq, bkv = DEFAULT_BLOCKS[name]
  bq, bkv = min(model_cfg.attention_block_q or bq, padded), min(model_cfg.attention_block_kv or bkv, padded)
  step = math.lcm(bq, bkv)
  return bq, bkv, -(-padded // step) * step


def unsupported(name: str, shape: Shape, model_cfg, platform: str) -> str | None:
  """Why kernel `name` cannot run this call (one phrase naming the config key to change), or None."""
  impl = IMPLS[name]
  if impl.platform is not None and platform != impl.platform and not (impl.kernel and INTERPRET):
    return f'needs a {impl.platform.upper()} (this backend is {platform})'
  if name == 'cudnn':
    if shape.softcap:
      return "has no soft-capping (model.attn_logit_softcap); use 'xla' or 'auto'"
    return None if _cudnn_fits(shape) else (
        'needs bfloat16/float16 compute (model.dtype), model.head_dim a multiple of 8 up to 128, an even row '
        "length, no relative-position bias and no context parallelism (mesh.sequence); use 'auto' or 'xla'")
  if not impl.kernel:
    return None
  if shape.has_bias:
    return "cannot add T5's relative-position bias (model.position_type='relative'); use 'xla'"
  if shape.windowed:
    return "cannot restrict attention to a sliding window (model.sliding_window); use 'xla'"
  if shape.softcap:
    return "has no soft-capping (model.attn_logit_softcap); use 'xla'"
  if shape.seq_split > 1:
    return 'cannot split the sequence (mesh.sequence > 1, context parallelism); use \'xla\''
  if not (shape.heads_alike and shape.heads_divide):
    return 'needs query and kv heads split alike over the mesh (mesh.rules for heads / kv_heads)'
  if _module(name) is None:
    return f'is not in this jax ({jax.__version__})'
  return None


def _cudnn_fits(shape: Shape) -> bool:
  H = shape.head_dim
  return (not shape.has_bias and shape.dtype in _HALF and not H % 8 and H <= 128
          and not shape.seq_len % 2 and shape.seq_split == 1 and shape.heads_alike)


def choose(requested: str, shape: Shape, model_cfg, platform: str) -> str:
  """The kernel that runs: `requested` if it can (else a UserError naming the key), or for 'auto' the
  platform's kernel where it fits: splash on TPU; on GPU the Pallas flash kernel, else cuDNN, for
  bfloat16/float16; XLA otherwise."""
  if requested != 'auto':
    why = unsupported(requested, shape, model_cfg, platform)
    if why:
      raise UserError(f"model.attention_impl='{requested}' {why}")
    return requested
  candidates = sorted((i for i in IMPLS.values() if i.auto is not None and i.platform == platform
                       and (not i.auto_dtypes or shape.dtype in i.auto_dtypes)), key=lambda i: i.auto)
  for impl in candidates:
    if unsupported(impl.name, shape, model_cfg, platform) is None:
      return impl.name
  return 'xla'


def shape_of(q_BTNH: Array, k_BSKH: Array, has_bias: bool, windowed: bool = False, softcap: bool = False) -> Shape:
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  heads, kv_heads = sharding.split_count('heads'), sharding.split_count('kv_heads')
  return Shape(seq_len=q_BTNH.shape[1], head_dim=q_BTNH.shape[-1], dtype=q_BTNH.dtype, has_bias=has_bias,
               windowed=windowed, softcap=softcap,
               seq_split=max(sharding.split_count('seq'), sharding.split_count('kv_seq'),
                             sharding.split_count('head_dim')),
               heads_alike=heads == kv_heads, heads_divide=not N % heads and not K % kv_heads)


# ---------------------------------------------------------------------------------------------------------
# The kernels. Each takes q_BTNH, k_BSKH, v_BSKH (S = T, self-attention), segment_ids_BT, causal, scale.


def _module(name: str):
  """The JAX module of a Pallas kernel, or None where this jax has none (its location has moved before)."""
  try:
    if name == 'splash':
      from jax.experimental.pallas.ops.tpu import splash_attention as module
    else:
      from jax.experimental.pallas.ops.gpu import attention as module
  except ImportError:
    return None
  return module


def _dataclass(cls, **candidates):
  """cls(**candidates) keeping the fields this jax's version of cls has (block-size fields were renamed
  between versions: block_k / block_kv)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in candidates.items() if k in names})


def _splash_local(q_BTNH, k_BSKH, v_BSKH, seg_BT, *, causal: bool, scale: float, bq: int, bkv: int):
  sa = _module('splash')
  B, T, N, H = q_BTNH.shape
  S = k_BSKH.shape[1]
  block_sizes = _dataclass(sa.BlockSizes, block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                           block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  head_mask = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
  kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * N), block_sizes=block_sizes, head_shards=1,
                              q_seq_shards=1, interpret=INTERPRET)
  # The kernel works on one row, heads first; the scale goes into q as in the splash authors' own use.
  q_BNTH = jnp.transpose(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), (0, 2, 1, 3))
  k_BKSH, v_BKSH = jnp.transpose(k_BSKH, (0, 2, 1, 3)), jnp.transpose(v_BSKH, (0, 2, 1, 3))
  one_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sa.SegmentIds(q=seg, kv=seg))
  out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, seg_BT)
  return jnp.transpose(out_BNTH, (0, 2, 1, 3))


def _pallas_gpu_local(q_BTNH, k_BSKH, v_BSKH, seg_BT, *, causal: bool, scale: float, bq: int, bkv: int):
  ga = _module('pallas_gpu')
  G = q_BTNH.shape[2] // k_BSKH.shape[2]
  # The kernel has no grouped heads: each kv head is repeated for its G query heads (the gradient of the
  # repeat sums them back); q head n reads kv head n // G, as in dot_attention.
  k_BSNH, v_BSNH = jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKH, G, axis=2)
  back = min(_GPU_BACKWARD_BLOCK, bq, bkv)
  block_sizes = _dataclass(ga.BlockSizes, block_q=bq, block_k=bkv, block_kv=bkv, block_q_dkv=back,
                           block_kv_dkv=back, block_q_dq=back, block_kv_dq=back)
  return ga.mha(q_BTNH, k_BSNH, v_BSNH, segment_ids=seg_BT, sm_scale=scale, causal=causal,
                block_sizes=block_sizes, interpret=INTERPRET)


_LOCAL: dict[str, Callable] = {'splash': _splash_local, 'pallas_gpu': _pallas_gpu_local}


def _shard_map(f, mesh, in_specs, out_specs):
  if hasattr(jax, 'shard_map'):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # older jax
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def run_kernel(name: str, q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array, *, causal: bool,
               scale: float, model_cfg) -> Array:
  """Kernel `name` (splash or pallas_gpu), per device under shard_map when a mesh is active: rows split as
  `batch`, heads as `heads` / `kv_heads`, the sequence and head dim whole."""
  T = q_BTNH.shape[1]
  bq, bkv, padded = blocks(name, model_cfg, T)
  if padded != T:  # a prompt of any length: pad to whole blocks with a segment of its own, cut it off after
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - T)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    q_BTNH, k_BSKH, v_BSKH = pad(q_BTNH), pad(k_BSKH), pad(v_BSKH)
    segment_ids_BT = pad(segment_ids_BT.astype(jnp.int32), -1)  # real rows use 0 (padding) and up
  local = lambda q, k, v, seg: _LOCAL[name](q, k, v, seg.astype(jnp.int32), causal=causal, bq=bq, bkv=bkv,
                                            scale=scale)
  active = sharding.active()
  if active is None:
    out_BTNH = local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  else:
    mesh, rules = active
    q_spec = sharding.logical_to_spec(('batch', None, 'heads', None), rules)
    kv_spec = sharding.logical_to_spec(('batch', None, 'kv_heads', None), rules)
    seg_spec = sharding.logical_to_spec(('batch', None), rules)
    out_BTNH = _shard_map(local, mesh, (q_spec, kv_spec, kv_spec, seg_spec), q_spec)(
        q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  return out_BTNH[:, :T]


def score_bytes(rows: float, heads: float, seq_len: int, layers: int) -> dict:
  """The score matrices the XLA path materialises and a flash kernel never does: float32 logits of
  rows x heads x T x T per layer, and what a backward pass keeps of them over all layers without remat."""
  per_layer = rows * heads * seq_len * seq_len * 4
  return {'per_layer': per_layer, 'all_layers': per_layer * layers}
