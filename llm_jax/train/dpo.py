"""Direct preference optimisation (Rafailov et al. 2023): the jitted train step for preference pairs.

A DPO batch (data/chat.py: DPO) has the chosen conversations in `inputs`, `targets`, `loss_mask`,
`segment_ids`, `positions` and the rejected ones in the same keys prefixed `rejected_`; both halves of a pair
carry the same segment id in the same row. One forward pass over both halves (stacked along the batch) gives
each pair's summed reply log-probability under the policy, and one more under the frozen reference params,
which come in as an argument of the step (never donated, never updated). The loss is

    -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

averaged over the pairs of the batch. Metrics add, over those pairs: reward_accuracy (the implicit reward
beta * (pi - ref) of the chosen reply above the rejected one's), chosen_reward, rejected_reward and margin.
Gradient accumulation, z-loss, label smoothing and the chunked loss are for cross-entropy and do not apply.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.run import lora
from llm_jax.train import optim
from llm_jax.train.state import TrainState
from llm_jax.models.outputs import token_nll

Array = jax.Array
DPO_METRICS = ('reward_accuracy', 'chosen_reward', 'rejected_reward', 'margin')


def pair_logps(model, params, batch: dict[str, Array]) -> tuple[Array, Array, Array]:
  """(chosen_BS, rejected_BS, valid_BS): summed reply log-probabilities of pair s of row b (S = T + 1 segment
  slots; slot 0 is padding) and whether that slot holds a pair."""
  B, T = batch['inputs'].shape
  both = {k: jnp.concatenate([batch[k], batch[f'rejected_{k}']], axis=0)
          for k in ('inputs', 'targets', 'loss_mask', 'positions', 'segment_ids')}
  logits_bTV, _ = model.apply({'params': params}, both['inputs'], both['positions'], both['segment_ids'])
  mask_bT = both['loss_mask'].astype(jnp.float32)
  logp_bT = -token_nll(logits_bTV, both['targets']) * mask_bT
  slots_bT = jnp.arange(2 * B)[:, None] * (T + 1) + both['segment_ids']
  sums_bS = jax.ops.segment_sum(logp_bT.ravel(), slots_bT.ravel(), num_segments=2 * B * (T + 1))
  counts_bS = jax.ops.segment_sum(mask_bT.ravel(), slots_bT.ravel(), num_segments=2 * B * (T + 1))
  sums_bS, counts_bS = sums_bS.reshape(2 * B, T + 1), counts_bS.reshape(2 * B, T + 1)
  valid_BS = (counts_bS[:B] > 0) & (counts_bS[B:] > 0)
  valid_BS = valid_BS.at[:, 0].set(False)
  return sums_bS[:B], sums_bS[B:], valid_BS


def dpo_loss(model, params, ref_params, batch, beta: float):
  chosen, rejected, valid = pair_logps(model, params, batch)
  ref_chosen, ref_rejected, _ = pair_logps(model, jax.lax.stop_gradient(ref_params), batch)
  chosen_reward = beta * (chosen - ref_chosen)
  rejected_reward = beta * (rejected - ref_rejected)
  margin = chosen_reward - rejected_reward
  w = valid.astype(jnp.float32)
  pairs = jnp.maximum(w.sum(), 1.0)

  def mean(x):
    return (x * w).sum() / pairs

  loss = mean(-jax.nn.log_sigmoid(margin))
  stats = {'reward_accuracy': mean((margin > 0).astype(jnp.float32)), 'chosen_reward': mean(chosen_reward),
           'rejected_reward': mean(rejected_reward), 'margin': mean(margin), 'pairs': w.sum()}
  return loss, stats


def make_dpo_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, mesh, rules,
                  state_shardings, batch_sharding, beta: float) -> Callable:
  """jit(dpo_step): (state, batch, ref_params) -> (state, metrics); the state is donated, ref_params not."""

  adapters_only = model.cfg.lora.rank > 0

  def dpo_step(state: TrainState, batch: dict[str, Array], ref_params):
    with sharding.activation_sharding(mesh, rules):
      rng, _ = jax.random.split(state.rng)
      frozen, trained = lora.trainable(state.params, adapters_only)  # LoRA: the adapters alone
      (loss, stats), grads = jax.value_and_grad(
          lambda t: dpo_loss(model, lora.merge(frozen, t), ref_params, batch, beta), has_aux=True)(trained)
      grad_norm = optim.global_norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, opt_state = tx.update(grads, state.opt_state, trained, finite=finite)
      params = lora.merge(frozen, optax.apply_updates(trained, updates))
    metrics = {'loss': loss, 'z_loss': jnp.zeros((), jnp.float32), 'grad_norm': grad_norm,
               'param_norm': optim.global_norm(params), 'learning_rate': lr_schedule(state.step),
               'tokens': batch['loss_mask'].sum() + batch['rejected_loss_mask'].sum(), 'finite': finite,
               **{k: stats[k] for k in DPO_METRICS}}
    skipped = optim.skipped_count(opt_state)
    if skipped is not None:
      metrics['skipped'] = skipped
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  step = jax.jit(dpo_step, in_shardings=(state_shardings, batch_sharding, state_shardings.params),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return step
