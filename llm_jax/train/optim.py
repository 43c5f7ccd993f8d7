"""The optimizer and learning-rate schedule, from the `train` section of the config.

The chain is: [skip non-finite] -> [store moments in opt_state_dtype] -> [clip global norm] -> optimizer
with decoupled weight decay (masked) and the schedule. Every optimizer's learning rate means the same
thing: the step size of a unit-scale update, so switching `train.optimizer` keeps the schedule's meaning.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------------------------------------
# Schedules: linear warmup from 0 to the peak over warmup_steps, then one of these shapes. `step` is the
# number of updates already applied (0 for the first), as optax counts.


SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt', 'wsd')  # schedule() below
OPTIMIZERS = ('adamw', 'adafactor', 'lion', 'muon')  # _base_optimizer() below


def schedule(train_cfg) -> optax.Schedule:
  t = train_cfg
  peak, warmup, total = t.learning_rate, t.warmup_steps, max(t.steps, 1)
  floor = peak * t.min_lr_ratio
  # WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): flat at the peak, then the last decay_fraction of
  # the steps decays with 1 - sqrt, the shape Hägele et al. 2024 found best for the cooldown.
  decay_start = max(warmup, total - int(round(t.decay_fraction * total)))

  def lr(step):
    s = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, s / warmup) if warmup else jnp.float32(1.0)
    if t.schedule == 'constant':
      return peak * warm
    if t.schedule == 'rsqrt':
      # Inverse square root of the step after warmup ("Attention is all you need"), continuous at warmup.
      return peak * warm * jnp.sqrt(max(warmup, 1) / jnp.maximum(s, max(warmup, 1)))
    if t.schedule == 'wsd':
      p = jnp.clip((s - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
      return warm * (floor + (peak - floor) * (1.0 - jnp.sqrt(p)))
    p = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
    shape = 0.5 * (1.0 + jnp.cos(math.pi * p)) if t.schedule == 'cosine' else 1.0 - p
    return jnp.where(s < warmup, peak * warm, floor + (peak - floor) * shape)

  return lr


# ---------------------------------------------------------------------------------------------------------
# Weight decay mask. Parameter naming convention every model family follows: norm gains live under a
# module whose name contains 'norm', biases are named 'bias' or '<matrix>_bias' (q_bias; T5's relative-position
# table, 'encoder_layers_rel_bias', counts as one), embedding tables have 'embedding' in their
# name ('embedding', 'pos_embedding'); the output projection 'unembed' is a matrix like any other.


def _leaf_name(path) -> str:
  return str(getattr(path[-1], 'key', path[-1])) if path else ''


def decay_mask(decay_embeddings: bool = True):
  """params -> a tree of bools: True where weight decay applies (matrices), False for gains and biases,
  which are not weights to shrink towards 0, and for embeddings unless `decay_embeddings`."""
  def keep(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    leaf = _leaf_name(path)
    if any('norm' in n for n in names) or leaf in ('bias', 'scale') or leaf.endswith('_bias'):
      return False
    if 'embedding' in _leaf_name(path):
      return decay_embeddings
    return True
  return lambda params: jax.tree_util.tree_map_with_path(keep, params)


# ---------------------------------------------------------------------------------------------------------
# Wrappers


def store_in_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """Keep `inner`'s floating-point state (moments) in `dtype` between steps and update it in float32:
  bfloat16 moments halve the optimizer's memory; the arithmetic of each update stays float32."""
  dtype = jnp.dtype(dtype)

  def cast(tree, to):
    return jax.tree.map(lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim else a,
                        tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None, **extra):
    updates, state = inner.update(updates, cast(state, jnp.float32), params, **extra)
    return updates, cast(state, dtype)

  return optax.GradientTransformationExtraArgs(init, update)


class SkipState(NamedTuple):
  inner: Any
  skipped: jax.Array  # int32: how many updates were skipped for a non-finite loss or gradient


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Apply `inner` only when the gradients (and the loss, passed as `finite=`) are finite; otherwise leave
  params and the optimizer's moments as they were and count the skip. The count is part of the optimizer
  state, so it is checkpointed and survives a resume.

  The learning-rate schedule's own count still advances on a skip: a skipped step uses up its place in the
  schedule, so the rate applied at step s is schedule(s), the one the train step logs (it follows
  state.step), and the decay ends at train.steps whatever was skipped. (Adam's count stays: it is the
  moments' bias correction, and the moments did not move.)"""

  def init(params):
    return SkipState(inner.init(params), jnp.zeros((), jnp.int32))

  def keep(new, old, ok):
    if isinstance(new, optax.ScaleByScheduleState):
      return new
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

  def update(updates, state, params=None, *, finite=True, **extra):
    ok = jnp.logical_and(finite, all_finite(updates))
    new_updates, new_inner = inner.update(updates, state.inner, params, **extra)
    new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: keep(n, o, ok), new_inner, state.inner,
                             is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
    return new_updates, SkipState(new_inner, state.skipped + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def skipped_count(opt_state) -> jax.Array | None:
  return opt_state.skipped if isinstance(opt_state, SkipState) else None


# ---------------------------------------------------------------------------------------------------------
# Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training"): the momentum of each weight
# matrix is orthogonalised (Newton-Schulz) before it is applied. It runs on the matrices that map the hidden
# size to something else or back; embeddings, the output projection, norm gains and biases keep AdamW, as in
# both papers. Which axes of a kernel are its inputs comes from the parameter's logical axis names.


def muon_dimensions(param_specs):
  """Logical specs (a PartitionSpec of axis names per parameter) -> a tree of MuonDimensionNumbers, None where
  AdamW applies. A kernel is a Muon matrix when it has an 'embed' axis and something else besides a 'layers'
  axis, and no 'vocab' axis. 'embed' first is the input side (q, k, v, gate, up): the rest is the output.
  'embed' last is the output side (o, down): the rest is the input. A 'layers' axis (scanned layers) is a
  batch axis: each layer's matrix is orthogonalised on its own."""
  from optax.contrib import MuonDimensionNumbers

  def dims(spec):
    names = tuple(spec) if spec is not None else ()
    axes = [i for i, n in enumerate(names) if n != 'layers']
    if 'embed' not in names or 'vocab' in names or len(axes) < 2:
      return None
    e = names.index('embed')
    rest = tuple(i for i in axes if i != e)
    if e == axes[0]:
      return MuonDimensionNumbers(reduction_axis=(e,), output_axis=rest)
    if e == axes[-1]:
      return MuonDimensionNumbers(reduction_axis=rest, output_axis=(e,))
    return None

  return jax.tree.map(dims, param_specs, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec))


def _muon(t, lr, mask, param_specs) -> optax.GradientTransformation:
  if param_specs is None:
    raise ValueError('train.optimizer=muon needs the parameters\' logical axis names (make_optimizer(..., '
                     'param_specs=...))')
  from optax.contrib import MuonDimensionNumbers, muon
  dims = muon_dimensions(param_specs)
  labels = jax.tree.map(lambda d: 'adam' if d is None else 'muon', dims,
                        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
  # consistent_rms=0.2 scales each orthogonalised update to AdamW's typical RMS (Liu et al. 2025), so the
  # learning rate and weight decay mean what they mean for adamw. Only the Muon matrices reach this branch.
  matrices = muon(lr, beta=t.muon_beta, weight_decay=t.weight_decay, weight_decay_mask=mask,
                  consistent_rms=0.2, muon_weight_dimension_numbers=dims)
  rest = optax.adamw(lr, b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay, mask=mask)
  return optax.partition({'muon': matrices, 'adam': rest}, labels)


# ---------------------------------------------------------------------------------------------------------


def _base_optimizer(t, lr: optax.Schedule, param_specs=None) -> optax.GradientTransformation:
  mask = decay_mask(t.decay_embeddings)
  if t.optimizer == 'muon':
    return _muon(t, lr, mask, param_specs)
  if t.optimizer == 'adamw':
    return optax.adamw(lr, b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay, mask=mask)
  if t.optimizer == 'lion':
    # Lion (Chen et al. 2023) takes sign steps: its learning rate is usually 3-10x below AdamW's.
    return optax.lion(lr, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask)
  if t.optimizer == 'adafactor':
    # Factored second moments (Shazeer & Stern 2018): O(rows + cols) state per matrix instead of O(rows *
    # cols), no first moment, updates clipped to RMS 1. Built here rather than with optax.adafactor, which
    # adds weight decay after the learning rate (unscaled by the schedule); here decay is decoupled and
    # scaled by the learning rate exactly as in adamw, and the learning rate is absolute (not relative to
    # each parameter's scale), so the same schedule means the same thing under every optimizer.
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(t.weight_decay, mask=mask),
        optax.scale_by_learning_rate(lr),
    )
  raise ValueError(f'unknown optimizer {t.optimizer!r}')  # validate() rejects this earlier


def make_optimizer(train_cfg, param_specs=None) -> optax.GradientTransformation:
  """param_specs: the model's logical axis names per parameter (train/state.py:param_logical_specs), which
  Muon needs to tell a kernel's input axes from its output axes; the other optimizers ignore them."""
  t = train_cfg
  tx = _base_optimizer(t, schedule(t), param_specs)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  if t.opt_state_dtype != 'float32':
    tx = store_in_dtype(tx, t.opt_state_dtype)
  if t.skip_nonfinite:
    tx = skip_nonfinite(tx)
  return tx
