"""Decoding: prefill the prompts into a KV cache, then sample token by token in one compiled loop.

Einsum letters as in models/layers.py; P prompt length (padded), N new tokens, C cache length.
Prompts of different lengths share a batch: each row is right-padded, and every row writes its cache at its
own positions, so row b's first new token sits at position len_b and overwrites the padding there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models import init_cache

Array = jax.Array


@dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  max_new_tokens: int = 64
  seed: int = 0


def sample_logits(logits_BV: Array, rng: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
  """Greedy when temperature is 0, else a sample from the temperature-scaled, top-k and nucleus-truncated
  distribution. All three knobs are traced values: changing them does not recompile."""
  V = logits_BV.shape[-1]
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
  # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p (the first
  # token always stays); its last logit is the cut.
  probs_BV = jax.nn.softmax(jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = (mass_before_BV < top_p) & (sorted_BV >= kth_B1)
  cut_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  masked_BV = jnp.where(scaled_BV >= cut_B1, scaled_BV, -jnp.inf)
  sampled_B = jax.random.categorical(rng, masked_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'cache_len'))
def _generate(model, params, prompt_BP: Array, lengths_B: Array, rng: Array, temperature: Array,
              top_k: Array, top_p: Array, eos_id: Array, *, max_new_tokens: int, cache_len: int):
  B, P = prompt_BP.shape
  cache = init_cache(model.cfg, B, cache_len)
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  logits_BPV, cache = model.apply({'params': params}, prompt_BP, positions_BP, jnp.ones_like(prompt_BP),
                                  cache=cache)
  last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  rng, step_rng = jax.random.split(rng)
  first_B = sample_logits(last_BV, step_rng, temperature, top_k, top_p)
  out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
  done_B = first_B == eos_id

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, prev_B, out_BN, done_B, rng = carry
    positions_B1 = (lengths_B + i - 1)[:, None]
    logits_B1V, cache = model.apply({'params': params}, prev_B[:, None], positions_B1,
                                    jnp.ones_like(positions_B1), cache=cache)
    rng, step_rng = jax.random.split(rng)
    next_B = sample_logits(logits_B1V[:, 0], step_rng, temperature, top_k, top_p)
    next_B = jnp.where(done_B, 0, next_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
    return i + 1, cache, next_B, out_BN, done_B | (next_B == eos_id), rng

  init = (jnp.int32(1), cache, first_B, out_BN, done_B, rng)
  _, _, _, out_BN, _, _ = jax.lax.while_loop(cond, body, init)
  return out_BN


def _bucket(n: int, multiple: int = 64) -> int:
  """Round prompt lengths up so a handful of compiled programs serve all prompts."""
  return max(multiple, -(-n // multiple) * multiple)


def generate(model, params, prompts: list[list[int]], sampling: SamplingParams, eos_id: int) -> list[list[int]]:
  """New tokens for each prompt (up to and including an EOS, if one is sampled)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  B = len(prompts)
  P = _bucket(max(len(p) for p in prompts))
  prompt_BP = np.zeros((B, P), np.int32)
  for b, p in enumerate(prompts):
    prompt_BP[b, :len(p)] = p
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  N = sampling.max_new_tokens
  out_BN = _generate(model, params, jnp.asarray(prompt_BP), jnp.asarray(lengths_B),
                     jax.random.PRNGKey(sampling.seed), jnp.float32(sampling.temperature),
                     jnp.int32(sampling.top_k), jnp.float32(sampling.top_p), jnp.int32(eos_id),
                     max_new_tokens=N, cache_len=P + N)
  results = []
  for row in np.asarray(out_BN).tolist():
    if eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return results
