"""The one way a run's params are read: `restore` for the run in a workdir (what inference, export and
`convert to-hf` load) and `from_init` for the run a fine-tuning run starts from (`init_from`).

Both read the newest step that reads (a damaged one is passed over with a warning) onto this machine's mesh,
whatever mesh the run trained on. A LoRA run's checkpoints hold its adapters only: `restore` joins them to
the frozen base its own `init_from` names, once, here, and with `merge_lora` folds them in (W + A B * alpha /
rank), giving the params of the plain architecture; that is how `init_from` and `to-hf` read a LoRA run.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax import storage
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.run import lora
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import open_for_reading
from llm_jax.train.state import abstract_params


_UNROLLED = re.compile(r'^(.*)_(\d+)$')


def to_layout(params: dict, scan_layers: bool) -> dict:
  """Scanned params (layers stacked on a leading axis) in a run's layout: unchanged, or `layers` unrolled into
  `layers_0`, `layers_1`... (model.scan_layers False)."""
  if scan_layers:
    return params
  out = {}
  for key, value in params.items():
    if key.endswith('layers') and isinstance(value, dict):
      for i in range(jax.tree.leaves(value)[0].shape[0]):
        out[f'{key}_{i}'] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = value
  return out


def from_layout(params: dict, stack=jnp.stack) -> dict:
  """The inverse of `to_layout`: unrolled layers stacked again."""
  groups: dict[str, dict[int, dict]] = {}
  out = {}
  for key, value in params.items():
    m = _UNROLLED.match(key)
    if m and m.group(1).endswith('layers') and isinstance(value, dict):
      groups.setdefault(m.group(1), {})[int(m.group(2))] = value
    else:
      out[key] = value
  for key, layers in groups.items():
    out[key] = jax.tree.map(lambda *a: stack(a), *[layers[i] for i in sorted(layers)])
  return out


def restore(workdir: str, mesh, rules, cfg=None, merge_lora: bool = False) -> tuple[int, Any]:
  """(step, params) of the run in `workdir` (its saved config unless `cfg` is given), laid out by `rules` on
  `mesh`. With `merge_lora`, a LoRA run's adapters are folded into its base."""
  cfg = cfg if cfg is not None else workdir_lib.load_config(workdir)
  abstract = abstract_params(build_model(cfg.model), mesh, rules)
  ckpt = open_for_reading(workdir)
  try:
    if not cfg.model.lora.rank:
      return ckpt.restore_latest_params(abstract)
    base_abstract, adapter_abstract = lora.split(abstract)
    step, adapters = ckpt.restore_latest_params(adapter_abstract)
  finally:
    ckpt.close()
  base, _ = from_init(cfg, mesh, rules, jax.tree.map(lambda a: a.sharding, base_abstract))
  params = lora.merge(base, adapters)
  return step, (lora.merged(params, cfg.model) if merge_lora else params)


def pretrained_config(path: str):
  """The config of the run `init_from` names, with a one-line error naming the key when it is not a run."""
  if not storage.isdir(path):
    raise UserError(f'config key init_from={path!r}: the workdir does not exist')
  return workdir_lib.load_config(path)


def _grow(table, rows: int, axis: int, rng):
  """`table` with rows (axis 0) or columns (axis 1) added up to `rows`, drawn from a normal with the existing
  ones' mean and standard deviation per dimension (see finetune.py for why)."""
  extra = rows - table.shape[axis]
  if extra <= 0:
    return table
  mean = jnp.mean(table, axis=axis, keepdims=True)
  std = jnp.std(table, axis=axis, keepdims=True)
  shape = list(table.shape)
  shape[axis] = extra
  new = mean + std * jax.random.normal(rng, shape, jnp.float32).astype(table.dtype)
  return jnp.concatenate([table, new.astype(table.dtype)], axis=axis)


def from_init(cfg, mesh, rules, target_shardings) -> tuple[Any, int]:
  """(params, step) of `cfg.init_from` in `cfg`'s layout, vocabulary grown to cfg.model.vocab_size, placed
  with `target_shardings` (a tree like the pretrained params: adapters are added by the caller). A LoRA run
  given as init_from starts from its merged weights."""
  if not cfg.init_from:
    raise UserError('config key init_from is empty: no pretrained run to read params from')
  pre = pretrained_config(cfg.init_from)
  step, params = restore(cfg.init_from, mesh, rules, pre, merge_lora=True)
  vocab = cfg.model.vocab_size
  if pre.model.scan_layers != cfg.model.scan_layers:  # the same weights, layers stacked or one by one
    params = to_layout(params, False) if pre.model.scan_layers else from_layout(params)

  def grow(p, rng):
    p = dict(p)
    rngs = jax.random.split(rng, 3)
    if 'embedding' in p:
      p['embedding'] = _grow(p['embedding'], vocab, 0, rngs[0])
    if 'unembed' in p:
      p['unembed'] = _grow(p['unembed'], vocab, 1, rngs[1])
    if 'unembed_bias' in p:
      p['unembed_bias'] = _grow(p['unembed_bias'], vocab, 0, rngs[2])
    return p

  return jax.jit(grow, out_shardings=target_shardings)(params, jax.random.PRNGKey(cfg.seed)), step
