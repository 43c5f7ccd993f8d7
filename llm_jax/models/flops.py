"""Model FLOPs per token and the peak FLOP rates of known accelerators: the two halves of MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s of the devices, where
the model FLOPs of one trained token of a single-stack model (decoder, encoder) are

    6 * N  +  12 * L * (num_heads * head_dim) * T

N the parameters that take part in a matmul (every weight matrix, the output projection included; not the
input embedding, a gather, unless it is tied to the output; not norm gains or biases), L layers, T the
sequence length (a layer with a sliding window of W keys counts min(T, W): Mistral, Gemma 2's local
layers). The first term is the forward (2 FLOPs per multiply-add) plus backward (twice the forward)
of the weight matmuls, the second the same for the attention scores and their weighted sum. Recomputation
under remat is not counted: it is a cost of the implementation, not work the model needs, which is what
makes MFU comparable across remat policies and with published numbers.

An encoder-decoder counts each stack by its own length: a row of S input tokens (data.seq_len) and T target
tokens (data.target_len) costs 6 * (N_in * S + N_out * T), N_in the encoder's weights and the
cross-attentions' key and value projections (they project the encoder's output), N_out the rest of the
decoder and the output layer; plus 12 * d_attn * (L_enc * S^2 + L_dec * T^2 + L_dec * T * S) for the
encoder's and decoder's self-attention and the decoder's cross-attention. Per token means per input token,
the tokens the throughput counts (batch_size * seq_len per step).

A LoRA run does less: the frozen base runs forward and gives input gradients (4 FLOPs per weight and token,
no weight gradient), the adapters forward and both gradients (6); attention is unchanged.
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


def _stream(names: list[str]) -> str:
  """Which tokens a weight runs on: 'input' for an encoder-decoder's encoder layers and its cross-attention
  key and value projections, 'target' for everything else (the only stream of a single-stack model)."""
  if any(n.startswith('encoder_') for n in names):
    return 'input'
  if 'cross_attn' in names and names[-1].split('_lora_')[0] in ('k', 'v'):
    return 'input'
  return 'target'


def matmul_params_by(model_cfg) -> dict[tuple[str, bool], int]:
  """N above split by (stream, is a LoRA adapter), counted from the model's abstract parameters (no memory
  is allocated)."""
  from llm_jax.models import build_model
  from llm_jax.train.state import init_params
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))
  out: dict[tuple[str, bool], int] = {}
  for path, a in jax.tree_util.tree_leaves_with_path(shapes):
    if _is_matmul_weight(path, model_cfg.tie_embeddings):
      names = [str(getattr(k, 'key', k)) for k in path]
      key = (_stream(names), '_lora_' in names[-1])
      out[key] = out.get(key, 0) + math.prod(a.shape)
  return out


def matmul_params(model_cfg) -> int:
  """N above: every matmul weight, adapters included."""
  return sum(matmul_params_by(model_cfg).values())


def flops_per_token(model_cfg, seq_len: int, target_len: int | None = None) -> float:
  """Training FLOPs (forward + backward) per token of a row of `seq_len` tokens; an encoder-decoder also
  needs its rows' `target_len` (data.target_len)."""
  from llm_jax.models import family_of
  from llm_jax.models.transformer import layer_windows
  m = model_cfg
  two_stacks = family_of(m).two_stacks
  if two_stacks and not target_len:
    raise ValueError('an encoder-decoder needs target_len (data.target_len) to count its decoder\'s FLOPs')
  S = seq_len
  T = target_len if two_stacks else seq_len
  lengths = {'input': S, 'target': T}
  base = 4 if m.lora.rank else 6  # a frozen base: forward and input gradients, no weight gradient
  matmuls = sum((6 if adapter else base) * n * lengths[stream]
                for (stream, adapter), n in matmul_params_by(m).items())
  d_attn = m.num_heads * m.head_dim
  if two_stacks:
    L_dec = m.num_decoder_layers or m.num_layers
    attention = 12 * d_attn * (m.num_layers * S * S + L_dec * T * T + L_dec * T * S)
  else:  # a sliding window (Mistral, Gemma 2's local layers) caps the keys a query sees
    keys = sum(min(S, w or S) for w in layer_windows(m, m.num_layers))
    attention = 12 * d_attn * S * keys
  return (matmuls + attention) / S


def mfu(tokens_per_sec: float, flops_per_token_: float, num_devices: int, peak: float | None) -> float | None:
  if peak is None or tokens_per_sec <= 0:
    return None
  return tokens_per_sec * flops_per_token_ / (num_devices * peak)
