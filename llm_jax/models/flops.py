"""Model FLOPs per token and the peak FLOP rates of known accelerators: the two halves of MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s of the devices, where
the model FLOPs of one trained token are

    6 * N  +  12 * L * (num_heads * head_dim) * T

N the parameters that take part in a matmul (every weight matrix, the output projection included; not the
input embedding, a gather, unless it is tied to the output; not norm gains or biases), L layers, T the
sequence length (a layer with a sliding window of W keys counts min(T, W): Mistral, Gemma 2's local
layers). The first term is the forward (2 FLOPs per multiply-add) plus backward (twice the forward)
of the weight matmuls, the second the same for the attention scores and their weighted sum. Recomputation
under remat is not counted: it is a cost of the implementation, not work the model needs, which is what
makes MFU comparable across remat policies and with published numbers.
"""

from __future__ import annotations

import math

import jax

# Dense bfloat16 peak FLOP/s per chip (TPU) or per GPU, from the vendors' data sheets (without 2:4
# sparsity). Matched in order against the lower-cased `device_kind`, so more specific names come first.
PEAK_BF16_FLOPS = (
    (('tpu v6 lite', 'tpu v6e'), 918e12),  # Trillium
    (('tpu v5 lite', 'tpu v5e'), 197e12),
    (('tpu v5p', 'tpu v5'), 459e12),
    (('tpu v4',), 275e12),
    (('h200',), 989e12),  # the H100 SXM's compute, more and faster memory
    (('h100 pcie',), 756e12),
    (('h100 nvl',), 835e12),
    (('h100',), 989e12),  # SXM5
    (('a100',), 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The peak of a device kind, or None when unknown (CPUs among them): no MFU beats a wrong MFU."""
  kind = device_kind.lower()
  for names, peak in PEAK_BF16_FLOPS:
    if any(name in kind for name in names):
      return peak
  return None


def device_peak_flops(devices=None) -> float | None:
  devices = jax.devices() if devices is None else devices
  if not devices or devices[0].platform == 'cpu':
    return None
  return peak_flops(devices[0].device_kind)


def _is_matmul_weight(path, tie_embeddings: bool) -> bool:
  names = [str(getattr(k, 'key', k)) for k in path]
  leaf = names[-1] if names else ''
  if any('norm' in n for n in names) or leaf in ('bias', 'scale') or leaf.endswith('_bias'):
    return False  # gains, biases (q_bias, ...), T5's relative-position bias tables
  if 'embedding' in leaf:
    return tie_embeddings and leaf == 'embedding'  # a tied table is also the output projection
  return True


def matmul_params(model_cfg) -> int:
  """N above, counted from the model's abstract parameters (no memory is allocated)."""
  from llm_jax.models import build_model
  from llm_jax.train.state import init_params
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))
  return sum(math.prod(a.shape) for path, a in jax.tree_util.tree_leaves_with_path(shapes)
             if _is_matmul_weight(path, model_cfg.tie_embeddings))


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token of a row of `seq_len` tokens."""
  from llm_jax.models.transformer import layer_windows
  m = model_cfg
  keys = sum(min(seq_len, w or seq_len) for w in layer_windows(m, m.num_layers))  # per query, over the layers
  attention = 12 * m.num_heads * m.head_dim * keys
  return 6 * matmul_params(m) + attention


def mfu(tokens_per_sec: float, flops_per_token_: float, num_devices: int, peak: float | None) -> float | None:
  if peak is None or tokens_per_sec <= 0:
    return None
  return tokens_per_sec * flops_per_token_ / (num_devices * peak)
