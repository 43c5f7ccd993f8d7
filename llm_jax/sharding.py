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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llm_jax.config import MESH_AXES
from llm_jax.errors import UserError

Rules = tuple[tuple[str, Any], ...]


def rules_from_config(rules) -> Rules:
  """Config rules (lists after a JSON round trip) as the tuples flax expects."""
  out = []
  for logical, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((logical, target))
  return tuple(out)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one -1 takes the devices the others leave."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  auto = [i for i, s in enumerate(sizes) if s == -1]
  if len(auto) > 1:
    raise UserError(f'config mesh: at most one axis may be -1, got '
                    f'{dict(zip(MESH_AXES, sizes))}')
  fixed = math.prod(s for s in sizes if s != -1)
  if auto:
    if num_devices % fixed:
      raise UserError(f'config mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices '
                      f'(the fixed axes multiply to {fixed})')
    sizes[auto[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(f'config mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                    f'{num_devices} are present')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices == list(jax.devices()):
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
    # Auto axes: shardings propagate GSPMD-style from the constraints we place (make_mesh's default
    # became Explicit axes, which would type every array's sharding instead).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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
