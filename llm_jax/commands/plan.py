"""`llm-jax plan`: does this config fit this mesh? Compiles the real train step (nothing runs) on the real
devices, or on fake CPU devices when this machine does not have them, and reports parameters, FLOPs per
token, memory per device against the device's capacity, the sharding of the largest arrays and a verdict.

Exit status: 0 when it fits (or the capacity is unknown), 1 when it does not, 2 for a mistake in the input.
"""

from __future__ import annotations

from llm_jax import distributed
from llm_jax.commands import common
from llm_jax.sharding import MESH_AXES
from llm_jax.errors import UserError

HELP = 'compile the train step for a mesh and say whether it fits in device memory'
_DCN = ('dcn_data', 'dcn_fsdp')


def add_arguments(p) -> None:
  common.add_config_flag(p)
  p.add_argument('--devices', type=int, default=None,
                 help='plan for this many devices (fake CPU devices unless this machine has exactly that '
                      'many accelerators); default: the devices present, or the product of --mesh')
  p.add_argument('--mesh', default=None,
                 help=f'axis sizes, e.g. fsdp=4,tensor=2; axes not named are 1 ({", ".join(MESH_AXES)}, '
                      f'{", ".join(_DCN)}; one ICI axis may be -1)')
  p.add_argument('--device_kind', default=None, help='size memory for this device, e.g. v5e, v5p, v4, h100, h200')
  p.add_argument('--device_memory', default=None, help='memory per device, e.g. 16GiB (overrides --device_kind)')
  p.add_argument('--top', type=int, default=8, help='how many of the largest arrays to list')
  distributed.add_arguments(p)


def mesh_overrides(text: str | None) -> list[tuple[str, str]]:
  """--mesh=fsdp=4,tensor=2 -> config overrides of every mesh axis (the unnamed ones 1)."""
  if text is None:
    return []
  sizes = {}
  for part in filter(None, (s.strip() for s in text.split(','))):
    key, eq, value = part.partition('=')
    key = key.strip()
    if not eq or key not in MESH_AXES + _DCN:
      raise UserError(f'--mesh={text}: expected axis=size pairs with axes from {MESH_AXES + _DCN}, got {part!r}')
    try:
      sizes[key] = int(value)
    except ValueError:
      raise UserError(f'--mesh={text}: size of {key} must be an integer, got {value!r}') from None
  if not sizes:
    raise UserError('--mesh is empty')
  return [(f'mesh.{a}', str(sizes.get(a, 1))) for a in MESH_AXES] + [
      (f'mesh.{a}', str(sizes[a])) for a in _DCN if a in sizes]


def device_count(cfg, devices_flag: int | None, mesh_flag: str | None) -> int | None:
  if devices_flag is not None:
    if devices_flag < 1:
      raise UserError(f'--devices={devices_flag}: expected a positive integer')
    return devices_flag
  if mesh_flag is None:
    return None
  sizes = [cfg.mesh[a] for a in MESH_AXES]
  if -1 in sizes:
    raise UserError(f'--mesh={mesh_flag} has an axis of -1: give --devices too')
  count = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
  for s in sizes:
    count *= s
  return count


def _devices(count: int | None):
  """The real devices when they are what was asked for, else `count` fake CPU devices."""
  import jax
  real = jax.devices()
  if count is None or (real[0].platform != 'cpu' and len(real) == count):
    return real
  cpus = jax.devices('cpu')
  if len(cpus) < count:
    raise UserError(f'--devices={count}: jax started with {len(cpus)} CPU devices before plan could add more')
  return cpus[:count]


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # private: without it, assume not started (the usual case for a command)
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def run(args, overrides) -> int:
  from llm_jax import config as config_lib
  from llm_jax.train import plan
  from llm_jax.run import workdir as workdir_lib
  from llm_jax.commands.common import nonempty
  for flag in ('config', 'mesh', 'device_kind', 'device_memory'):  # empty is a mistake, not the default
    nonempty(f'--{flag}', getattr(args, flag))
  if args.top < 1:
    raise UserError(f'--top={args.top}: expected a positive integer')
  recipe = args.config or workdir_lib.default_recipe()
  cfg = config_lib.load(recipe, list(overrides) + mesh_overrides(args.mesh))
  from llm_jax.run import finetune
  cfg = finetune.resolve(cfg)  # init_from: the pretrained vocabulary (grown for chat markers) is what trains
  count = device_count(cfg, args.devices, args.mesh)
  cluster = distributed.initialize_from_args(args)
  import jax
  if cluster is None and count is not None and not _backend_started():
    # Fake CPU devices for a mesh this machine does not have; must precede the backend's start.
    jax.config.update('jax_num_cpu_devices', count)
  devices = _devices(count)
  capacity = plan.device_capacity(devices, args.device_kind, args.device_memory)
  report = plan.make_plan(cfg, devices, capacity, top=args.top,
                          target=plan.target_platform(devices, args.device_kind))
  if jax.process_index() == 0:
    print(plan.render(report, recipe, fake=devices[0].platform == 'cpu'))
  fits, _ = plan.verdict(report)
  return 1 if fits is False else 0
