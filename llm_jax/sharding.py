"""The device mesh, the logical-axis rules, and the helpers that turn logical names into shardings.

Model code names dimensions logically (`batch`, `embed`, ...) and calls `constrain`; the mapping to mesh axes
lives in `config.mesh.rules` alone. `constrain` is a no-op unless a step function installed a mesh and rules
with `activation_sharding(...)` while it is traced, so models stay usable outside any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llm_jax.errors import UserError

# The mesh axes, from the least to the most communication per step: a data-parallel replica exchanges
# gradients once per step, FSDP gathers weights once per layer, context parallelism gathers keys and values
# once per layer, tensor parallelism reduces activations twice per layer. jax.make_mesh gives the last axes
# the fastest links, so `tensor` goes last.
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')

# Every logical axis name the models use (see models/layers.py). `kv_seq` is the key length of attention,
# which context parallelism gathers whole while queries stay split over `sequence`.
# `table` is the rows of small lookup tables (learned positions, token types, T5's relative-position buckets),
# never split.
LOGICAL_AXES = ('batch', 'seq', 'kv_seq', 'cache_seq', 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
                'layers', 'table')

# Logical axis -> mesh axes, in priority order (flax semantics: a mesh axis is used at most once per array,
# so `batch` claims ('data', 'fsdp') for activations before `embed` could claim 'fsdp'; parameters, which
# have no batch axis, get `embed` sharded over 'fsdp', which is what makes FSDP). Parameters are also split
# over `sequence`, which would otherwise hold whole copies: context parallelism doubles as FSDP for weights.
_REPLICATED = tuple((name, None) for name in ('kv_seq', 'cache_seq', 'head_dim', 'layers', 'table'))
RULE_PRESETS = {
    # Pure data parallelism: every device holds every weight; rows split over data and fsdp alike.
    'dp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', None), ('embed', None), ('heads', None),
           ('kv_heads', None), ('mlp', None)) + _REPLICATED,
    # ZeRO-3 / FSDP: weights, gradients and optimizer state split along `embed`, gathered per layer.
    'fsdp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', None), ('embed', ('fsdp', 'sequence')),
             ('heads', None), ('kv_heads', None), ('mlp', None)) + _REPLICATED,
    # FSDP plus Megatron-style tensor parallelism of heads, MLP and vocabulary over `tensor`.
    'fsdp_tp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', 'tensor'),
                ('embed', ('fsdp', 'sequence')), ('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'))
               + _REPLICATED,
}

Rules = tuple[tuple[str, Any], ...]


def rules_from_config(mesh_cfg) -> Rules:
  """The logical-axis rules of the config's mesh section: its own `mesh.rules` first, then its preset's.

  Flax takes the first rule whose mesh axes are still free, so an extra rule such as ('mlp', None) overrides
  the preset for that axis and leaves the others alone.
  """
  if not hasattr(mesh_cfg, 'preset'):
    raise TypeError('rules_from_config takes the mesh section of the config (cfg.mesh), not its rules')
  extra = tuple((logical, tuple(t) if isinstance(t, list) else t) for logical, t in mesh_cfg.rules)
  return extra + RULE_PRESETS[mesh_cfg.preset]


def _sizes_text(sizes) -> str:
  return ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))


def mesh_layout(mesh_cfg, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ICI sizes per slice, DCN sizes across slices) of the axes MESH_AXES; one -1 takes the devices left."""
  dcn = tuple(mesh_cfg[f'dcn_{a}'] if f'dcn_{a}' in mesh_cfg else 1 for a in MESH_AXES)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise UserError(f'config mesh: mesh.dcn_data x mesh.dcn_fsdp = {slices} slices/nodes do not divide the '
                    f'{num_devices} devices')
  per_slice = num_devices // slices
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  auto = [i for i, s in enumerate(sizes) if s == -1]
  if len(auto) > 1:
    raise UserError(f'config mesh: at most one axis may be -1, got {_sizes_text(sizes)}')
  fixed = math.prod(s for s in sizes if s != -1)
  where = f'{per_slice} devices per slice/node' if slices > 1 else f'{num_devices} devices'
  if auto:
    if per_slice % fixed:
      raise UserError(f'config mesh: {_sizes_text(sizes)} cannot fill {where} '
                      f'(the fixed axes multiply to {fixed})')
    sizes[auto[0]] = per_slice // fixed
  if math.prod(sizes) != per_slice:
    need = math.prod(sizes) * slices
    raise UserError(f'config mesh: {_sizes_text(sizes)}'
                    + (f' times {slices} slices/nodes' if slices > 1 else '')
                    + f' needs {need} devices, {num_devices} are present')
  return tuple(sizes), dcn


def hybrid_device_array(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices laid out for a multi-slice / multi-node mesh: each axis's outer DCN factor steps across slices
  (TPU `slice_index`) or, where devices carry no slices (GPU nodes), across groups of processes.

  Processes are grouped in order, so with one process per GPU a node's processes must have consecutive
  indices (SLURM's block distribution, the default).
  """
  count = math.prod(dcn)
  slices = sorted({getattr(d, 'slice_index', 0) for d in devices})
  if len(slices) > 1:
    if len(slices) != count:
      raise UserError(f'config mesh: mesh.dcn_data x mesh.dcn_fsdp = {count}, but the devices span '
                      f'{len(slices)} slices')
    return _hybrid(ici, dcn, devices, process_is_granule=False)
  processes = sorted({d.process_index for d in devices})
  if len(processes) % count:
    raise UserError(f'config mesh: mesh.dcn_data x mesh.dcn_fsdp = {count} does not divide the '
                    f'{len(processes)} processes (one slice: DCN groups are groups of processes)')
  per_group = len(processes) // count
  if per_group == 1:
    return _hybrid(ici, dcn, devices, process_is_granule=True)
  groups = [[d for d in devices if processes.index(d.process_index) // per_group == g] for g in range(count)]
  blocks = np.empty(count, dtype=object)
  for g, group in enumerate(groups):
    blocks[g] = mesh_utils.create_device_mesh(ici, group, allow_split_physical_axes=True)
  return np.block(blocks.reshape(dcn).tolist())


def _hybrid(ici, dcn, devices, process_is_granule: bool) -> np.ndarray:
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule,
                                                allow_split_physical_axes=True)
  except ValueError as e:  # uneven slices: name them rather than show jax's internals
    raise UserError(f'config mesh: cannot lay out ICI {_sizes_text(ici)} x DCN {tuple(dcn)}: {e}') from None


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  ici, dcn = mesh_layout(mesh_cfg, len(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  _check_axes_used(mesh_cfg, shape)
  # Auto axes: shardings propagate GSPMD-style from the constraints we place (make_mesh's default became
  # Explicit axes, which would type every array's sharding instead).
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) > 1:
    return Mesh(hybrid_device_array(ici, dcn, devices), MESH_AXES, axis_types=auto)
  if devices == list(jax.devices()):
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _check_axes_used(mesh_cfg, shape) -> None:
  """A mesh axis of more than one device that no rule names would make its devices repeat each other's work."""
  used = set()
  for _, target in rules_from_config(mesh_cfg):
    used.update(target if isinstance(target, (tuple, list)) else (target,))
  for axis, size in zip(MESH_AXES, shape):
    if size > 1 and axis not in used:
      raise UserError(f'config mesh: mesh.{axis} has {size} devices but no rule of mesh.preset='
                      f'{mesh_cfg.preset} or mesh.rules shards anything over {axis!r}; set mesh.{axis}=1 or '
                      'choose a preset that uses it')


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  return nn.logical_to_mesh_axes(tuple(names), rules)


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings(mesh: Mesh, logical_tree, rules: Rules):
  """A tree of logical PartitionSpecs (names) -> the same tree of NamedShardings."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
                      logical_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Every batch array is [batch, seq]."""
  return named_sharding(mesh, ('batch', 'seq'), rules)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def check_batch(batch_size: int, seq_len: int, mesh: Mesh, rules: Rules, microbatches: int = 1) -> None:
  """The global batch [batch_size, seq_len], and each of its microbatches, split evenly over the mesh axes
  that `batch` and `seq` map to."""
  spec = logical_to_spec(('batch', 'seq'), rules)
  for entry, key, value, what in zip(spec, ('data.batch_size', 'data.seq_len'), (batch_size, seq_len),
                                     ('batch', 'sequence')):
    axes = _axes(entry)
    shards = math.prod(mesh.shape[a] for a in axes)
    names = " x ".join("mesh." + a for a in axes)
    if value % shards:
      raise UserError(f'config key {key}={value} is not divisible by the {shards} {what} shards of the mesh '
                      f'({names})')
    if what == 'batch' and (value // microbatches) % shards:
      raise UserError(f'config key train.microbatches={microbatches}: microbatches of {value // microbatches} '
                      f'rows do not divide over the {shards} batch shards of the mesh ({names})')


def check_divisible(shapes, logical_specs, mesh: Mesh, rules: Rules, what: str = 'parameter') -> None:
  """Every dimension of every array is divisible by the devices its rule splits it over (jit refuses uneven
  shardings with a message about pjit internals; this one names the array, its logical axis and the fix)."""
  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), names in zip(jax.tree_util.tree_leaves_with_path(shapes), specs):
    for dim, name, entry in zip(leaf.shape, tuple(names), logical_to_spec(tuple(names), rules)):
      axes = _axes(entry)
      shards = math.prod(mesh.shape[a] for a in axes)
      if dim % shards:
        raise UserError(f'{what} {jax.tree_util.keystr(path, simple=True, separator="/")} {tuple(leaf.shape)}: '
                        f'its {name} dimension ({dim}) does not split over {" x ".join(axes)} = {shards} '
                        'devices; change the mesh, the model or mesh.rules')


# ---------------------------------------------------------------------------------------------------------
# Host arrays that every process holds whole (prompts, evaluation batches), to and from the mesh.


def host_to_global(array: np.ndarray, sharding_: NamedSharding) -> jax.Array:
  """The same host array on every process -> one global array: each process places its own devices' blocks
  (jax.device_put would need every device to be this process's)."""
  array = np.asarray(array)
  if sharding_.is_fully_addressable:
    return jax.device_put(array, sharding_)
  return jax.make_array_from_callback(array.shape, sharding_, lambda index: array[index])


def fetch(tree):
  """Global arrays -> numpy on every process (gathered across processes where they span several)."""
  leaves = jax.tree.leaves(tree)
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
    return jax.device_get(tree)  # one call: every copy starts before the first is waited for

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------------------
# Activation constraints: installed by the step functions while tracing.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar('llm_jax_mesh',
                                                                                  default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules):
  token = _ACTIVE.set((mesh, rules) if mesh is not None else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pin an activation's sharding by logical names (no-op outside `activation_sharding`)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def active() -> tuple[Mesh, Rules] | None:
  """The mesh and rules a step installed while it is traced (None outside one): for kernels that place
  themselves on the mesh with shard_map."""
  current = _ACTIVE.get()
  return None if current is None or current[0] is None else current


def split_count(name: str) -> int:
  """How many ways the active rules split logical axis `name` (1 outside `activation_sharding`): lets a
  kernel with its own partitioning rules (cuDNN attention) step aside where they would refuse the layout."""
  active = _ACTIVE.get()
  if active is None or active[0] is None:
    return 1
  mesh, rules = active
  spec = logical_to_spec((name,), rules)[0]
  count = 1
  for axis in _axes(spec):
    count *= mesh.shape[axis]
  return count
