"""LoRA runs: which params are adapters, an optimizer that only sees them, and merging them into the base.

Adapters are ordinary params named `<projection>_lora_a` / `_lora_b` beside the projection they adapt
(models/layers.py: lora_delta), so the model, sharding and decoding treat them like any other weight. Only
they train: the train steps differentiate the adapters alone (`trainable`) and the run's optimizer sees
nothing else, so its state holds moments for the adapters alone and scales with the rank, not the model. Checkpoints of a LoRA run hold the adapters only (checkpoint.py: `params`
filtered); the frozen base is read from `init_from` whenever the run is loaded. `llm-jax export
--merge-lora` folds W + A B * alpha / rank into a plain workdir.
"""

from __future__ import annotations

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import optax

MARK = '_lora_'


def is_adapter(path) -> bool:
  return MARK in str(path[-1])


def _flat(params):
  return traverse.flatten_dict(params)


def split(params):
  """(base, adapters): two nested dicts of the params that are not / are adapters."""
  flat = _flat(params)
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  return traverse.unflatten_dict(base), traverse.unflatten_dict(adapters)


def merge(*trees):
  """One nested dict of several disjoint ones (base and adapters)."""
  trees = [t for t in trees if t]
  if len(trees) == 1:  # nothing to merge (`trainable` of a run without LoRA): the tree as it is
    return trees[0]
  flat = {}
  for t in trees:
    flat.update(_flat(t))
  return traverse.unflatten_dict(flat)


def trainable(params, adapters_only: bool):
  """(frozen, trained): what a train step holds fixed and what it differentiates. A LoRA run differentiates
  its adapters alone, so no gradient of the frozen base is ever built (a float32 copy of the whole model
  every step) and nothing the base does can make a step non-finite; otherwise every param trains."""
  return split(params) if adapters_only else ({}, params)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` on the adapters alone. `init` takes the whole params (what train/state.py's StateFactory passes)
  and builds state for the adapters only; `update` takes the adapters' gradients and params (the train steps
  differentiate nothing else: `trainable`) and returns their updates."""

  def init(params):
    return tx.init(split(params)[1])

  def update(updates, state, params=None, **extra):
    return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(init, update)


def merged(params, model_cfg):
  """Params without adapters whose projections include them: W + A B * alpha / rank, so a model without
  LoRA computes what the adapted one did."""
  flat = _flat(params)
  scale = model_cfg.lora.alpha / model_cfg.lora.rank
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for key, a in flat.items():
    if not key[-1].endswith(MARK + 'a'):
      continue
    name = key[-1][:-len(MARK + 'a')]
    b = flat[key[:-1] + (name + MARK + 'b',)]
    w_key = key[:-1] + (name,)
    w = out[w_key]
    if w.ndim != a.ndim + b.ndim - 2:  # scanned layers: a leading layers axis on all three
      delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
    else:
      delta = jnp.tensordot(a, b, axes=1)
    out[w_key] = (w.astype(jnp.float32) + scale * delta.astype(jnp.float32)).astype(w.dtype)
  return traverse.unflatten_dict(out)
