"""The optimizer and learning-rate schedule, from the `train` section of the config."""

from __future__ import annotations

import jax
import optax


def schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to learning_rate * min_lr_ratio at the last step."""
  t = train_cfg
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=t.learning_rate,
      warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.learning_rate * t.min_lr_ratio,
  )


def decay_mask(params):
  """Weight decay on matrices only: norm scales are gains, shrinking them towards 0 only hurts."""
  def keep(path, _):
    return not any('norm' in str(getattr(k, 'key', k)) for k in path)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  t = train_cfg
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
