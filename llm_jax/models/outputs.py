"""What every consumer of a model's output shares: the forward pass over a batch and the per-token negative
log-likelihood. Training (train/loss.py, train/step.py), scoring (infer/loglik.py) and evaluation use these,
so that none of them imports another's step.

Einsum letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.models import model_args

Array = jax.Array


def forward(model, params, batch: dict[str, Array], rngs=None) -> Array:
  logits_BTV, _ = model.apply({'params': params}, *model_args(model.cfg, batch), rngs=rngs)
  return logits_BTV


def token_nll(logits_BTV: Array, targets_BT: Array) -> Array:
  """Per-token negative log-likelihood, float32, without materialising a one-hot."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
