"""The jitted train and eval steps: one jit boundary each, explicit shardings, state donated.

Batch arrays are [B, T] (see data/pipeline.py): inputs, targets, loss_mask, segment_ids, positions.
Gradient accumulation happens inside the one train step: the batch is cut into k microbatches of B / k rows
that a `lax.scan` runs one after the other, summing the gradients of their token sums divided by the whole
batch's token count, and the optimizer updates once. The update equals that of one batch of B rows
(tests/test_train_step.py) and the activations are those of B / k rows.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.run import lora
from llm_jax.data import objectives
from llm_jax.models import build_model
from llm_jax.train import dpo, optim
from llm_jax.train.loss import SUM_KEYS, LossConfig, model_sums, objective_sum, token_sums
from llm_jax.train.state import StateFactory, TrainState, param_logical_specs

Array = jax.Array


def loss_and_stats(model, params, batch, rngs=None, with_accuracy: bool = False,
                   loss_cfg: LossConfig = LossConfig()):
  """The mean training objective over unmasked tokens, and the token sums behind it (train/loss.py)."""
  sums = model_sums(model, params, batch, loss_cfg, rngs, with_accuracy)
  return objective_sum(sums, loss_cfg) / jnp.maximum(sums['tokens'], 1.0), sums


def split_microbatches(batch: dict[str, Array], k: int) -> dict[str, Array]:
  """[B, T] -> [k, B / k, T], microbatch i taking rows i, i + k, ...: every device's contiguous block of
  rows then contributes equally to every microbatch, so no microbatch lives on a subset of the devices."""
  def split(a_BT):
    B = a_BT.shape[0]
    a_kbT = a_BT.reshape(B // k, k, *a_BT.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(a_kbT, (None, 'batch', 'seq'))
  return jax.tree.map(split, batch)


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, mesh, rules,
                    state_shardings, batch_sharding, loss_cfg: LossConfig = LossConfig(),
                    microbatches: int = 1) -> Callable:
  """jit(train_step): (state, batch) -> (state, metrics); the state is donated and updated in place.

  Metrics (scalars): loss (mean cross-entropy, unsmoothed: the number eval reports too), z_loss (mean
  log(Z)^2, whatever its weight), learning_rate, grad_norm (before clipping, of the params that train: a LoRA
  run's adapters), param_norm (all params, after the update),
  tokens, finite (loss and gradients finite), and skipped (total skipped updates) with skip_nonfinite.
  """

  adapters_only = model.cfg.lora.rank > 0
  trained_shardings = lora.trainable(state_shardings.params, adapters_only)[1]

  def grads_and_sums(frozen, trained, batch, dropout_rng, tokens):
    # Dividing by the whole batch's token count inside the objective (a constant to the gradient) makes
    # microbatch gradients add up to the batch's, with no extra pass over the gradients afterwards.
    def objective(t):
      sums = model_sums(model, lora.merge(frozen, t), batch, loss_cfg, rngs={'dropout': dropout_rng})
      return objective_sum(sums, loss_cfg) / tokens, sums
    return jax.grad(objective, has_aux=True)(trained)

  def accumulate(frozen, trained, batch, dropout_rng, tokens):
    micro = split_microbatches(batch, microbatches)
    zero_grads = jax.tree.map(jnp.zeros_like, trained)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}

    def body(carry, xs):
      grads_acc, sums_acc = carry
      mb, i = xs
      grads, sums = grads_and_sums(frozen, trained, mb, jax.random.fold_in(dropout_rng, i), tokens)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      grads_acc = jax.lax.with_sharding_constraint(grads_acc, trained_shardings)
      return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), (micro, jnp.arange(microbatches)))
    return grads, sums

  def train_step(state: TrainState, batch: dict[str, Array]):
    with sharding.activation_sharding(mesh, rules):
      rng, dropout_rng = jax.random.split(state.rng)
      tokens = jnp.maximum(batch['loss_mask'].astype(jnp.float32).sum(), 1.0)
      frozen, trained = lora.trainable(state.params, adapters_only)
      if microbatches > 1:
        grads, sums = accumulate(frozen, trained, batch, dropout_rng, tokens)
      else:
        grads, sums = grads_and_sums(frozen, trained, batch, dropout_rng, tokens)
      loss = sums['nll_sum'] / tokens
      grad_norm = optim.global_norm(grads)  # of what trains: the norm clipping sees
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, opt_state = tx.update(grads, state.opt_state, trained, finite=finite)
      params = lora.merge(frozen, optax.apply_updates(trained, updates))
    metrics = {
        'loss': loss,
        'z_loss': sums['z_sum'] / tokens,
        'grad_norm': grad_norm,
        'param_norm': optim.global_norm(params),
        'learning_rate': lr_schedule(state.step),
        'tokens': sums['tokens'],
        'finite': finite,
    }
    skipped = optim.skipped_count(opt_state)
    if skipped is not None:
      metrics['skipped'] = skipped
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  repl = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


class TrainSetup(NamedTuple):
  """`step` is the objective's: (state, batch) -> (state, metrics), or with `reference` (a preference
  objective, DPO) (state, batch, reference_params) -> (state, metrics)."""
  model: Any
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  factory: StateFactory
  batch_sharding: Any
  step: Callable
  reference: bool = False


def setup_train_step(cfg, mesh, rules) -> TrainSetup:
  """The jitted train step of a resolved config and what it is built from: what `llm-jax train` runs
  (train/loop.py) and tools/bench_train.py times, one path for both."""
  model = build_model(cfg.model, deterministic=cfg.model.dropout_rate == 0.0)
  tx = optim.make_optimizer(cfg.train, param_logical_specs(model))
  if cfg.model.lora.rank:
    tx = lora.optimizer(tx)  # the run's optimizer on the adapters alone; no state for the frozen base
  lr_schedule = optim.schedule(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  if objectives.of(cfg.data).preference:
    step = dpo.make_dpo_step(model, tx, lr_schedule, mesh, rules, factory.shardings, batch_sharding,
                             cfg.data.dpo_beta)
    return TrainSetup(model, tx, lr_schedule, factory, batch_sharding, step, reference=True)
  step = make_train_step(model, tx, lr_schedule, mesh, rules, factory.shardings, batch_sharding,
                         loss_cfg=LossConfig.from_config(cfg.train), microbatches=cfg.train.microbatches)
  return TrainSetup(model, tx, lr_schedule, factory, batch_sharding, step)


def make_eval_step(model, mesh, rules, param_shardings, batch_sharding, loss_chunk: int = 0) -> Callable:
  """jit(eval_step): (params, batch) -> summed nll, token count and correct predictions of the batch."""
  loss_cfg = LossConfig(chunk=loss_chunk)

  def eval_step(params, batch):
    with sharding.activation_sharding(mesh, rules):
      sums = model_sums(model, params, batch, loss_cfg, with_accuracy=True)
    return {k: sums[k] for k in ('nll_sum', 'tokens', 'correct')}

  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=sharding.replicated(mesh))


__all__ = ['TrainSetup', 'loss_and_stats', 'make_eval_step', 'make_train_step',
           'setup_train_step', 'token_sums']
