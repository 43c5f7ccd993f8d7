"""The language-model loss: cross-entropy with optional label smoothing and PaLM's z-loss, over the whole batch
at once or chunk by chunk along the sequence.

Everything is computed as sums over the unmasked tokens; the caller divides by the token count once. Sums
make gradient accumulation exact (k microbatches add up to the sums of one big batch) and padding free.

Einsum letters as in models/layers.py, plus C chunk length and n number of chunks (T = n * C).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.models import model_args
from llm_jax.models.transformer import project

Array = jax.Array

SUM_KEYS = ('nll_sum', 'z_sum', 'smooth_sum', 'tokens')  # what token_sums returns (plus 'correct' if asked)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  z_loss: float = 0.0  # weight of mean log(Z)^2
  label_smoothing: float = 0.0
  chunk: int = 0  # positions per chunk; 0: the whole sequence at once

  @classmethod
  def from_config(cls, train_cfg) -> LossConfig:
    return cls(z_loss=train_cfg.z_loss, label_smoothing=train_cfg.label_smoothing, chunk=train_cfg.loss_chunk)


def token_sums(logits_BTV: Array, targets_BT: Array, mask_BT: Array, label_smoothing: float = 0.0,
               with_accuracy: bool = False) -> dict[str, Array]:
  """Sums over unmasked tokens, float32 whatever the logits' dtype:

  nll_sum     -log p(target): the loss people compare (eval reports the same quantity)
  z_sum       log(Z)^2, PaLM's auxiliary loss (Chowdhery et al. 2022, sec. 5) that keeps the normaliser near 1
  smooth_sum  cross-entropy against the smoothed target (1 - eps) * onehot + eps / V; equals nll_sum at eps 0
  tokens      the number of unmasked tokens
  correct     top-1 hits, if asked (an argmax over V costs about what the softmax does)
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  mask_BT = mask_BT.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = lse_BT - target_logit_BT
  sums = {'nll_sum': (nll_BT * mask_BT).sum(), 'z_sum': (jnp.square(lse_BT) * mask_BT).sum(),
          'tokens': mask_BT.sum()}
  if label_smoothing:
    # -sum_v q_v log p_v with q uniform is lse - mean_v(logit_v): no one-hot or [B, T, V] target needed.
    uniform_BT = lse_BT - logits_BTV.mean(axis=-1)
    smooth_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * uniform_BT
    sums['smooth_sum'] = (smooth_BT * mask_BT).sum()
  else:
    sums['smooth_sum'] = sums['nll_sum']
  if with_accuracy:
    sums['correct'] = ((jnp.argmax(logits_BTV, axis=-1) == targets_BT) * mask_BT).sum()
  return sums


def chunked_token_sums(x_BTD: Array, unembed_DV: Array, targets_BT: Array, mask_BT: Array, chunk: int,
                       logits_dtype, label_smoothing: float = 0.0, with_accuracy: bool = False, cap: float = 0.0):
  """`token_sums` of `project(x_BTD, unembed_DV, logits_dtype, cap)` computed C positions at a time.

  Only one chunk's logits ([B, C, V]) exist at any moment, forward and backward: the chunk body is
  rematerialised, so the backward pass recomputes a chunk's logits from its hidden states instead of the
  forward pass saving all of them. With V = 128k, B = 8, T = 4096 the whole-batch float32 logits are 16 GiB;
  chunks of 512 positions hold 2 GiB.
  """
  B, T, D = x_BTD.shape
  n = T // chunk
  x_nBCD = x_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)
  targets_nBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)
  mask_nBC = mask_BT.reshape(B, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sums(x_BCD, targets_BC, mask_BC):
    logits_BCV = project(x_BCD, unembed_DV, logits_dtype, cap)
    return token_sums(logits_BCV, targets_BC, mask_BC, label_smoothing, with_accuracy)

  def body(totals, xs):
    sums = chunk_sums(*xs)
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = jax.eval_shape(chunk_sums, x_nBCD[0], targets_nBC[0], mask_nBC[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  totals, _ = jax.lax.scan(body, zeros, (x_nBCD, targets_nBC, mask_nBC))
  return totals


def model_sums(model, params, batch: dict[str, Array], loss_cfg: LossConfig, rngs=None,
               with_accuracy: bool = False) -> dict[str, Array]:
  """The token sums of `batch` under `model`, chunked if `loss_cfg.chunk`."""
  args = model_args(model.cfg, batch)
  if loss_cfg.chunk and loss_cfg.chunk < batch['targets'].shape[1]:
    (x_BTD, unembed_DV), _ = model.apply({'params': params}, *args, return_hidden=True, rngs=rngs)
    return chunked_token_sums(x_BTD, unembed_DV, batch['targets'], batch['loss_mask'], loss_cfg.chunk,
                              jnp.dtype(model.cfg.logits_dtype), loss_cfg.label_smoothing, with_accuracy,
                              model.cfg.final_logit_softcap)
  logits_BTV, _ = model.apply({'params': params}, *args, rngs=rngs)
  return token_sums(logits_BTV, batch['targets'], batch['loss_mask'], loss_cfg.label_smoothing,
                    with_accuracy)


def objective_sum(sums: dict[str, Array], loss_cfg: LossConfig) -> Array:
  """What training minimises, summed over tokens: smoothed cross-entropy plus the weighted z-loss."""
  total = sums['smooth_sum']
  if loss_cfg.z_loss:
    total = total + loss_cfg.z_loss * sums['z_sum']
  return total
