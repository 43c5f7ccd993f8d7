"""Plan before you pay: compile the real train step for a config's mesh (lower + compile, nothing runs and
nothing is allocated) and say what it needs per device against what the device has.

The figures come from XLA's memory analysis of the compiled step: arguments (this device's share of
parameters, optimizer state and batch), outputs (mostly the new state, written over the donated old one)
and temporaries (activations kept for the backward pass, gradients, collective buffers). Compiled for fake
CPU devices, the analysis is the CPU backend's: the same program and shardings, but buffer assignment and
fusion differ from a TPU's or GPU's, so it is an estimate to leave a margin on, not a promise.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.models import family_of, flops
from llm_jax.data import objectives, packing
from llm_jax.errors import UserError
from llm_jax.models import attention_kernels as kernels
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


def target_platform(devices, device_kind: str | None) -> str | None:
  """'tpu' / 'gpu' / 'cpu': the platform the plan is for (--device_kind's family, else the devices'), None
  for a device kind this table does not know."""
  if device_kind:
    low = device_kind.lower()
    family = next((f for f, names, _ in DEVICE_MEMORY if any(n in low for n in names)), None)
    return family or ('tpu' if 'tpu' in low else 'gpu' if re.search(r'\d+\s*gb', low) else None)
  return devices[0].platform


def _split(mesh, rules, name: str) -> int:
  entry = sharding.logical_to_spec((name,), rules)[0]
  axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  return math.prod(mesh.shape[a] for a in axes)


def attention_on(cfg, mesh, rules, platform: str) -> tuple[str | None, str | None]:
  """(the kernel model.attention_impl runs on `platform` for this config and mesh as attention.attend chooses it
  for the training rows, or None where the named kernel refuses; the refusal, or why the platform's own
  kernel does not apply, or None)."""
  m = cfg.model
  # compute_dtype's 'auto' for that platform, not for the one planning here.
  dtype = jnp.dtype(m.dtype if m.dtype != 'auto' else jnp.float32 if platform == 'cpu' else jnp.bfloat16)
  heads, kv_heads = _split(mesh, rules, 'heads'), _split(mesh, rules, 'kv_heads')
  shape = kernels.Shape(seq_len=cfg.data.seq_len, head_dim=m.head_dim, dtype=dtype,
                        has_bias=m.position_type == 'relative',
                        seq_split=max(_split(mesh, rules, a) for a in ('seq', 'kv_seq', 'head_dim')),
                        heads_alike=heads == kv_heads,
                        heads_divide=not m.num_heads % heads and not m.num_kv_heads % kv_heads,
                        windowed=m.sliding_window > 0, softcap=m.attn_logit_softcap > 0)
  try:
    impl = kernels.choose(m.attention_impl, shape, m, platform)
  except UserError as e:
    return None, str(e)
  own = {'tpu': 'splash', 'gpu': 'pallas_gpu'}.get(platform)
  return impl, (f'{own} {kernels.unsupported(own, shape, m, platform)}' if own and impl not in (own, 'cudnn')
                else None)


def abstract_batch(data_cfg, batch_sharding) -> dict:
  """The train step's batch as shapes: the objective's packed keys, [batch_size, stream length] each."""
  streams = objectives.streams(data_cfg)  # the layout does not depend on the tokenizer
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in packing.empty_batch(streams, data_cfg.batch_size).items()}


def make_plan(cfg, devices, capacity: Capacity | None, top: int = 8, target: str | None = None) -> dict:
  """Compile the train step of `cfg` on `devices` and measure it; the report's data. `target`: the platform
  the plan is for when the devices here stand in for it (target_platform)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh)
  here = devices[0].platform
  asked = cfg
  compiled_attention, _ = attention_on(cfg, mesh, rules, here)
  if compiled_attention is None:
    # A kernel of another platform (splash planned on fake CPU devices): compile the XLA path it replaces,
    # whose score matrices are then in the temporaries; the report says what the kernel saves there.
    cfg = copy.deepcopy(cfg)
    cfg.model.attention_impl = compiled_attention = 'xla'
  sharding.check_batch(cfg.data.batch_size, cfg.data.seq_len, mesh, rules, cfg.train.microbatches)
  # The step exactly as train/loop.py builds it (loss options, microbatches and LoRA change its memory).
  setup = setup_train_step(cfg, mesh, rules)
  factory, batch_sh = setup.factory, setup.batch_sharding
  state = factory.abstract_sharded()
  batch = abstract_batch(cfg.data, batch_sh)
  # A preference step (DPO) also holds the frozen reference params (an argument, never donated): they count.
  compiled = setup.step.lower(state, batch, *([state.params] if setup.reference else [])).compile()
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
      'attention': _attention_report(asked, mesh, rules, compiled_attention, target or here),
  }


def _attention_report(cfg, mesh, rules, compiled: str, target: str | None) -> dict:
  """The kernel compiled here and, for another target, the one that runs there; for a TPU target, the score
  matrices (float32 rows x heads x T x T per layer) that splash never builds, at the config's row length."""
  report = {'compiled': compiled, 'target': target, 'target_impl': None, 'why_not': None, 'scores': None,
            'seq_len': cfg.data.seq_len}
  if target in ('tpu', 'gpu'):
    # The model config as given (a kernel another platform needs was swapped for XLA only to compile here).
    report['target_impl'], report['why_not'] = attention_on(cfg, mesh, rules, target)
  if target == 'tpu':
    rows = _rows_per_device(cfg, mesh, rules) / cfg.train.microbatches
    heads = cfg.model.num_heads / _split(mesh, rules, 'heads')
    layers = cfg.model.num_layers + (cfg.model.num_decoder_layers or cfg.model.num_layers
                                     if family_of(cfg.model).two_stacks else 0)
    report['scores'] = kernels.score_bytes(rows, heads, cfg.data.seq_len, layers)
  return report


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
  lines.extend(_attention_lines(report['attention'], report))
  lines.append('verdict: ' + verdict(report)[1])
  return '\n'.join(lines)


def _attention_lines(a: dict, report: dict) -> list[str]:
  lines = [f'attention: {a["compiled"]} compiled here ({kernels.IMPLS[a["compiled"]].why})']
  target = (a['target'] or '').upper()
  if a['target'] in ('tpu', 'gpu') and a['target_impl'] is None:
    lines.append(f'attention on {target}: REFUSED there: {a["why_not"]}')
  elif a['target'] in ('tpu', 'gpu') and (a['target'] != report['platform'] or a['why_not']):
    lines.append(f'attention on {target}: {a["target_impl"]} ({kernels.IMPLS[a["target_impl"]].why})'
                 + (f'; {a["why_not"]}' if a['why_not'] else ''))
  if a['scores']:
    s = a['scores']
    verb = 'splash never builds' if a['target_impl'] == 'splash' else 'splash would avoid'
    size = lambda n: _gib(n) if n >= GiB else f'{n / 2 ** 20:.1f} MiB'
    lines.append(f'  score matrices {verb}: {size(s["per_layer"])} per layer per device (float32 rows x heads '
                 f'x T x T, T = data.seq_len = {a["seq_len"]}), up to {size(s["all_layers"])} over all layers '
                 'in a backward pass without remat')
  return lines
