"""The train state, built abstract first: shapes via `jax.eval_shape`, shardings from the logical names the
model declares, then created directly sharded by a jitted init (no host ever holds the full params)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.models import example_batch, model_args


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpoints hold plain arrays


def _dummy_inputs(model):
  return model_args(model.cfg, example_batch(model.cfg))


def _boxed_shapes(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *_dummy_inputs(model))


def param_logical_specs(model):
  """The logical PartitionSpec (axis names) of every parameter."""
  return nn.get_partition_spec(_boxed_shapes(model))['params']


def init_params(model, rng):
  return nn.meta.unbox(model.init(rng, *_dummy_inputs(model)))['params']


def param_shardings(model, mesh, rules):
  boxed = _boxed_shapes(model)
  logical = nn.get_partition_spec(boxed)['params']
  sharding.check_divisible(nn.meta.unbox(boxed)['params'], logical, mesh, rules)
  return sharding.tree_shardings(mesh, logical, rules)


def abstract_params(model, mesh, rules):
  """ShapeDtypeStructs of the params with their target shardings (to restore params alone into)."""
  shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      param_shardings(model, mesh, rules))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, replicated):
  """An optimizer-state leaf shaped like the parameter whose path ends its own path (Adam's mu['layers']
  ['mlp']['gate'] for params['layers']['mlp']['gate']) is sharded like it; anything else (step counts,
  Adafactor's factored row/column statistics, a skip counter) is small and replicated. Matching paths
  rather than optax.tree_map_params works for every optimizer and wrapper, including ones whose state is
  not a copy of the parameter tree."""
  shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  by_path = {tuple(path): (a.shape, s)
             for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), shardings)}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def pick(path, leaf):
    for n in lengths:
      match = by_path.get(tuple(path[-n:])) if len(path) >= n else None
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


class StateFactory:
  """Abstract state, its shardings, and the jitted sharded initialiser for one model + optimizer + mesh."""

  def __init__(self, model, tx: optax.GradientTransformation, mesh, rules):
    self.model, self.tx, self.mesh, self.rules = model, tx, mesh, rules
    self.param_shardings = param_shardings(model, mesh, rules)
    self.abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    repl = sharding.replicated(mesh)
    opt_shardings = opt_state_shardings(self.abstract.opt_state, self.abstract.params, self.param_shardings,
                                        repl)
    self.shardings = TrainState(step=repl, params=self.param_shardings, opt_state=opt_shardings, rng=repl)

  def _init(self, rng) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    params = init_params(self.model, params_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      rng=state_rng)

  def init_from_params(self, params, seed: int) -> TrainState:
    """A fresh state (step 0, new optimizer moments, rng from `seed`) around given params."""
    def make(params, rng):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                        rng=jax.random.split(rng)[1])
    return jax.jit(make, out_shardings=self.shardings)(params, jax.random.PRNGKey(seed))

  def init(self, seed: int) -> TrainState:
    init = jax.jit(self._init, out_shardings=self.shardings)
    return init(jax.random.PRNGKey(seed))

  def abstract_sharded(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)
