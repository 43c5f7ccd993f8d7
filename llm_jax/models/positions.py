"""Positions: rotary embeddings (with Llama 3's frequency scaling) and T5's relative-position buckets and
bias buckets (the learned bias table is layers.relative_bias). Letters as in layers.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def rope_frequencies(half: int, theta: float, scaling=None) -> Array:
  """The `half` rotary frequencies theta^(-i / half), rescaled by `model.rope_scaling`: 'linear' divides
  them all by `factor`; 'llama3' (Llama 3.1) divides those whose wavelength is longer than the original
  context / low_freq_factor, keeps those shorter than original / high_freq_factor, and blends in between."""
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  kind = 'none' if scaling is None else scaling.type
  if kind == 'linear':
    return inv_freq / scaling.factor
  if kind == 'llama3':
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    ratio = s.original_max_positions / wavelen
    smooth = jnp.clip((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor), 0.0, 1.0)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  return inv_freq


def rope(x_BTNH: Array, positions_BT: Array, theta: float, scaling=None) -> Array:
  """Rotary positions (Su et al. 2021), rotating the two halves of the head dim (the LLaMA layout that
  Hugging Face checkpoints use, so their weights load without permutation)."""
  half = x_BTNH.shape[-1] // 2
  inv_freq = rope_frequencies(half, theta, scaling)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def relative_bucket(relative_BTS: Array, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
  """T5's bucket of each (key position - query position): one bucket per distance below half the buckets
  (per direction when bidirectional), then logarithmically wider ones up to `max_distance`, beyond which
  all distances share the last. Computed in float32 in the same order as the reference implementations
  (Mesh TensorFlow, Hugging Face), so distances on a bucket boundary land in the same bucket."""
  bucket = jnp.zeros_like(relative_BTS)
  if bidirectional:
    num_buckets //= 2
    bucket = (relative_BTS > 0).astype(relative_BTS.dtype) * num_buckets
    distance = jnp.abs(relative_BTS)
  else:
    distance = -jnp.minimum(relative_BTS, 0)
  exact = num_buckets // 2
  ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / jnp.float32(math.log(max_distance / exact))
  large = exact + (ratio * (num_buckets - exact)).astype(relative_BTS.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, large)
