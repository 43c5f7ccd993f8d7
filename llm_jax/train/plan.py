"""Plan before you pay: compile the real train step for a config's mesh (lower + compile, nothing runs and
nothing is allocated) and say what it needs per device against what the device has.

The figures come from XLA's memory analysis of the compiled step: arguments (this device's share of
parameters, optimizer state and batch), outputs (mostly the new state, written over the donated old one)
and temporaries (activations kept for the backward pass, gradients, collective buffers). Compiled for fake
CPU devices, the analysis is the CPU backend's: the same program and shardings, but buffer assignment and
fusion differ from a TPU's or GPU's, so it is an estimate to leave a margin on, not a promise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import numpy as np

from llm_jax import sharding
from llm_jax.models import flops
from llm_jax.data import objectives, packing
from llm_jax.errors import UserError
from llm_jax.train import dpo
from llm_jax.train.step import setup_train_step

GiB = 1024 ** 3

# Memory per device (bytes), matched in order against the lower-cased device kind or --device_kind.
# TPU: HBM per chip (one JAX device per chip from v4 on). GPU: the card's memory; JAX preallocates a
# fraction of it (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75), which is what a run can use.
DEVICE_MEMORY = (
    ('tpu', ('v5 lite', 'v5e', 'v5litepod'), 16 * GiB),
    ('tpu', ('v6 lite', 'v6e'), 32 * GiB),
    ('tpu', ('v5p', 'v5'), 95 * GiB),
    ('tpu', ('v4',), 32 * GiB),
    ('gpu', ('h200',), 141 * GiB),
    ('gpu', ('h100 nvl',), 94 * GiB),
    ('gpu', ('h100',), 80 * GiB),
    ('gpu', ('a100',), 40 * GiB),  # the 80 GB model says so in its name, read first
    ('gpu', ('l4',), 24 * GiB),
)


@dataclasses.dataclass
class Capacity:
  bytes: float
  where: str  # how it was found, for the report


def parse_size(text: str) -> float:
  """'16GiB', '80GB', '512MiB', '16' (GiB) -> bytes."""
  m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*', text.lower())
  if not m:
    raise UserError(f'--device_memory={text!r}: expected a size such as 16GiB, 80GB or 512MiB')
  value, unit = float(m.group(1)), m.group(2) or 'gib'
  scale = {'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12, 'ki': 2 ** 10, 'mi': 2 ** 20, 'gi': 2 ** 30,
           'ti': 2 ** 40}[unit.rstrip('b') or 'gi']
  return value * scale


def capacity_of_kind(kind: str) -> Capacity | None:
  low = kind.lower()
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75'))
  sized = re.search(r'(\d+)\s*gb', low)  # 'NVIDIA A100-SXM4-80GB'
  if sized and 'tpu' not in low:
    return Capacity(int(sized.group(1)) * GiB * fraction, f'{kind}: {sized.group(1)} GiB x {fraction:g} for JAX')
  for family, names, size in DEVICE_MEMORY:
    if any(n in low for n in names):
      if family == 'gpu':
        return Capacity(size * fraction, f'{kind}: {size / GiB:g} GiB x {fraction:g} for JAX')
      return Capacity(size, f'{kind}: {size / GiB:g} GiB of HBM')
  return None


def device_capacity(devices, device_kind: str | None, device_memory: str | None) -> Capacity | None:
  if device_memory:
    return Capacity(parse_size(device_memory), f'--device_memory={device_memory}')
  if device_kind:
    cap = capacity_of_kind(device_kind)
    if cap is None:
      known = ', '.join(n for _, names, _ in DEVICE_MEMORY for n in names[:1])
      raise UserError(f'--device_kind={device_kind!r}: unknown memory size (known: {known}); '
                      'give --device_memory=SIZE instead')
    return cap
  d = devices[0]
  if d.platform == 'cpu':
    return None
  stats = d.memory_stats() or {}
  if stats.get('bytes_limit'):
    return Capacity(stats['bytes_limit'], f'{d.device_kind}: what JAX may use')
  return capacity_of_kind(d.device_kind)


def abstract_batch(data_cfg, batch_sharding) -> dict:
  """The train step's batch as shapes: the objective's packed keys, [batch_size, stream length] each."""
  streams = objectives.streams(data_cfg)  # the layout does not depend on the tokenizer
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in packing.empty_batch(streams, data_cfg.batch_size).items()}


def make_plan(cfg, devices, capacity: Capacity | None, top: int = 8) -> dict:
  """Compile the train step of `cfg` on `devices` and measure it; the report's data."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.data.seq_len, mesh, rules, cfg.train.microbatches)
  # The step exactly as train/loop.py builds it (loss options, microbatches and LoRA change its memory).
  setup = setup_train_step(cfg, mesh, rules)
  factory, batch_sh = setup.factory, setup.batch_sharding
  state = factory.abstract_sharded()
  batch = abstract_batch(cfg.data, batch_sh)
  if cfg.data.objective == 'dpo':
    # DPO's step also holds the frozen reference params (an argument, never donated): they count too.
    step = dpo.make_dpo_step(setup.model, setup.tx, setup.lr_schedule, mesh, rules, factory.shardings, batch_sh,
                             cfg.data.dpo_beta)
    compiled = step.lower(state, batch, state.params).compile()
  else:
    compiled = setup.step.lower(state, batch).compile()
  mem = compiled.memory_analysis()

  arrays = []
  for path, a in jax.tree_util.tree_leaves_with_path(state):
    itemsize = np.dtype(a.dtype).itemsize
    arrays.append({'name': jax.tree_util.keystr(path, simple=True, separator='/'), 'shape': tuple(a.shape),
                   'dtype': str(np.dtype(a.dtype)), 'spec': str(a.sharding.spec),
                   'bytes': math.prod(a.shape) * itemsize,
                   'device_bytes': math.prod(a.sharding.shard_shape(a.shape)) * itemsize})
  params = jax.tree.leaves(state.params)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len, cfg.data.target_len)
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
      mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
  return {
      'devices': len(devices), 'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
      'mesh': dict(mesh.shape), 'preset': cfg.mesh.preset,
      'params': sum(math.prod(p.shape) for p in params),
      'param_bytes': sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize for p in params),
      'state_bytes': sum(a['bytes'] for a in arrays),
      'flops_per_token': per_token, 'tokens_per_step': tokens, 'flops_per_step': per_token * tokens,
      'memory': {'arguments': mem.argument_size_in_bytes, 'outputs': mem.output_size_in_bytes,
                 'aliased': mem.alias_size_in_bytes, 'temporaries': mem.temp_size_in_bytes,
                 'code': mem.generated_code_size_in_bytes, 'total': total},
      'capacity': None if capacity is None else {'bytes': capacity.bytes, 'where': capacity.where},
      'largest': sorted(arrays, key=lambda a: -a['bytes'])[:top],
      'remat': cfg.model.remat, 'rows_per_device': _rows_per_device(cfg, mesh, rules),
  }


def _rows_per_device(cfg, mesh, rules) -> float:
  entry = sharding.logical_to_spec(('batch',), rules)[0]
  axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  return cfg.data.batch_size / math.prod(mesh.shape[a] for a in axes)


def verdict(report: dict) -> tuple[bool | None, str]:
  """(fits, one line): None when the device's memory is unknown."""
  need = report['memory']['total']
  cap = report['capacity']
  if cap is None:
    return None, (f'needs {_gib(need)} per device; the capacity of {report["device_kind"]} is unknown: '
                  'give --device_kind (e.g. v5e, h100) or --device_memory to get a verdict')
  share = need / cap['bytes']
  if share > 1:
    return False, (f'DOES NOT FIT: needs {_gib(need)} per device, {_gib(cap["bytes"])} available '
                   f'({share:.0%}). {_advice(report)}')
  if share > 0.9:
    return True, f'FITS, tightly: {_gib(need)} of {_gib(cap["bytes"])} per device ({share:.0%}); leave a margin'
  return True, f'FITS: {_gib(need)} of {_gib(cap["bytes"])} per device ({share:.0%})'


def _advice(report: dict) -> str:
  mem, cap = report['memory'], report['capacity']['bytes']
  tips = []
  if mem['arguments'] > 0.5 * cap:
    tips.append('split the weights and optimizer state over more devices (mesh.fsdp, mesh.tensor)')
  if mem['temporaries'] > 0.5 * cap:
    rows = report['rows_per_device']
    tips.append(f'fewer rows per device (now {rows:g}: lower data.batch_size or add devices)')
    if report['remat'] != 'full':
      tips.append('model.remat=full')
    tips.append('context parallelism (mesh.sequence) for long rows')
  return 'Try: ' + '; '.join(tips) + '.' if tips else ''


def _gib(n: float) -> str:
  return f'{n / GiB:.2f} GiB'


def render(report: dict, recipe: str, fake: bool) -> str:
  mesh = ' x '.join(f'{a} {s}' for a, s in report['mesh'].items())
  where = (f'{report["devices"]} fake CPU devices (no accelerator here: memory is the CPU compile\'s '
           'estimate)' if fake else f'{report["devices"]} x {report["device_kind"]}')
  m = report['memory']
  lines = [
      f'plan: {recipe} on {where}',
      f'mesh: {mesh} (preset {report["preset"]})',
      f'parameters: {report["params"]:,} ({_gib(report["param_bytes"])}); parameters + optimizer state '
      f'{_gib(report["state_bytes"])} in all',
      f'FLOPs: {report["flops_per_token"] / 1e9:,.2f} GFLOPs per token (6N + attention), '
      f'{report["flops_per_step"] / 1e12:,.1f} TFLOPs per step of {report["tokens_per_step"]:,} tokens',
      'memory per device, from XLA\'s analysis of the compiled train step:',
      f'  arguments    {_gib(m["arguments"]):>12}  this device\'s parameters, optimizer state and batch',
      f'  outputs      {_gib(m["outputs"]):>12}  of which {_gib(m["aliased"])} reuse the donated arguments',
      f'  temporaries  {_gib(m["temporaries"]):>12}  activations kept for the backward pass, gradients, '
      'buffers',
      f'  total        {_gib(m["total"]):>12}'
      + (f'  of {_gib(report["capacity"]["bytes"])} ({report["capacity"]["where"]})'
         if report['capacity'] else ''),
      'largest arrays (global shape, sharding, per device):',
  ]
  width = max(len(a['name']) for a in report['largest'])
  for a in report['largest']:
    shape = f'{a["dtype"]}[{",".join(map(str, a["shape"]))}]'
    lines.append(f'  {a["name"]:<{width}}  {shape:<26} {a["spec"]:<44} {a["device_bytes"] / 2**20:>10,.1f} MiB')
  lines.append('verdict: ' + verdict(report)[1])
  return '\n'.join(lines)
