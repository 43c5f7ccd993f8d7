"""Losses and the jitted train / eval steps: one jit boundary each, explicit shardings, state donated.

Batch arrays are [B, T] (see data/pipeline.py): inputs, targets, loss_mask, segment_ids, positions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.models import model_args
from llm_jax.train.state import TrainState

Array = jax.Array


def token_nll(logits_BTV: Array, targets_BT: Array) -> Array:
  """Per-token negative log-likelihood, float32, without materialising a one-hot."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT


def global_norm(tree) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def forward(model, params, batch: dict[str, Array], rngs=None) -> Array:
  logits_BTV, _ = model.apply({'params': params}, *model_args(model.cfg, batch), rngs=rngs)
  return logits_BTV


def loss_and_stats(model, params, batch, rngs=None, with_accuracy: bool = False):
  """Mean masked next-token loss, and the sums behind it (plus correct top-1 predictions if asked: an
  argmax over the vocabulary costs as much as the softmax, so the train step skips it)."""
  logits_BTV = forward(model, params, batch, rngs)
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  nll_BT = token_nll(logits_BTV, batch['targets'])
  tokens = mask_BT.sum()
  nll_sum = (nll_BT * mask_BT).sum()
  stats = {'nll_sum': nll_sum, 'tokens': tokens}
  if with_accuracy:
    stats['correct'] = ((jnp.argmax(logits_BTV, -1) == batch['targets']) * mask_BT).sum()
  return nll_sum / jnp.maximum(tokens, 1.0), stats


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, mesh, rules,
                    state_shardings, batch_sharding) -> Callable:
  """jit(train_step): (state, batch) -> (state, metrics); the state is donated and updated in place."""

  def train_step(state: TrainState, batch: dict[str, Array]):
    with sharding.activation_sharding(mesh, rules):
      rng, dropout_rng = jax.random.split(state.rng)

      def loss_fn(params):
        return loss_and_stats(model, params, batch, rngs={'dropout': dropout_rng})

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'grad_norm': global_norm(grads),
        'learning_rate': lr_schedule(state.step),
        'tokens': stats['tokens'],
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  repl = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


def make_eval_step(model, mesh, rules, param_shardings, batch_sharding) -> Callable:
  """jit(eval_step): (params, batch) -> summed nll, token count and correct predictions of the batch."""

  def eval_step(params, batch):
    with sharding.activation_sharding(mesh, rules):
      _, stats = loss_and_stats(model, params, batch, with_accuracy=True)
    return stats

  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=sharding.replicated(mesh))
