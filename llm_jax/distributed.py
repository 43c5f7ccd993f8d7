"""Multi-host start-up: `jax.distributed` initialised before any device is touched, from (in this order)

  1. the flags --coordinator_address --num_processes --process_id (what launch/local.sh passes; any left
     out are taken from SLURM when it is there),
  2. SLURM's variables (srun: one process per node, or one per GPU),
  3. a TPU VM or GKE TPU pod, whose own metadata jax reads (`jax.distributed.initialize()` without arguments),

or not at all: one process, which is also what --num_processes=1 asks for.

Before jax connects, the processes meet in a small rendezvous of our own on the coordinator's port. jax's own
connection, when the coordinator never answers or a process never starts, ends the process after its
timeout with a C++ check failure and a stack trace; the rendezvous turns those cases into one line that
says who is missing, within --distributed_timeout seconds.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Mapping

from llm_jax.errors import UserError

DEFAULT_TIMEOUT_S = 300  # jax's own default: workers of a pod may start minutes apart (pip, image pulls)
_HELLO = 'llm-jax-rendezvous'


@dataclasses.dataclass(frozen=True)
class Cluster:
  source: str  # 'flags', 'slurm' or 'tpu'
  coordinator_address: str | None = None  # host:port of process 0; None: jax finds it (TPU)
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # the GPUs this process drives; None: all it sees


def add_arguments(p) -> None:
  g = p.add_argument_group('multi-host (default: from SLURM or the TPU pod, else one process)')
  g.add_argument('--coordinator_address', default=None, help='host:port of process 0, reachable by all')
  g.add_argument('--num_processes', type=int, default=None, help='processes in the job (1: no jax.distributed)')
  g.add_argument('--process_id', type=int, default=None, help='this process, 0 .. num_processes-1')
  g.add_argument('--distributed_timeout', type=float, default=DEFAULT_TIMEOUT_S,
                 help='seconds to wait for the coordinator and every process before giving up')


# ---------------------------------------------------------------------------------------------------------
# Where the job's shape comes from


def resolve(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
            env: Mapping[str, str] | None = None) -> Cluster | None:
  """The cluster this process belongs to, or None for a single process."""
  env = os.environ if env is None else env
  if num_processes == 1 and process_id in (None, 0):
    return None
  slurm = slurm_cluster(env)
  flags = {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id}
  if any(v is not None for v in flags.values()):
    if slurm is not None:  # flags override SLURM's values one by one
      flags = {k: (v if v is not None else getattr(slurm, k)) for k, v in flags.items()}
    missing = [f'--{k}' for k, v in flags.items() if v is None]
    if missing:
      given = [f'--{k}' for k, v in flags.items() if v is not None]
      raise UserError(f'{", ".join(given)} also needs {", ".join(missing)} (outside SLURM and TPU pods)')
    _check(flags['coordinator_address'], flags['num_processes'], flags['process_id'])
    if flags['num_processes'] == 1:
      return None
    local = slurm.local_device_ids if slurm is not None else None
    return Cluster('flags', local_device_ids=local, **flags)
  if slurm is not None:
    return slurm
  if _on_tpu_pod(env):
    return Cluster('tpu')
  return None


def _check(address: str, num_processes: int, process_id: int) -> None:
  if num_processes < 1:
    raise UserError(f'--num_processes={num_processes}: expected a positive integer')
  if not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id}: expected 0 to {num_processes - 1} (--num_processes='
                    f'{num_processes})')
  split_address(address)


def split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  host = host.strip('[]')  # [::1]:1234
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator_address={address!r}: expected host:port, e.g. 10.0.0.1:8476')
  return host, int(port)


def slurm_cluster(env: Mapping[str, str]) -> Cluster | None:
  """A job step started by srun with more than one task; None otherwise (e.g. a batch script's own shell)."""
  nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
  if not all(env.get(k) for k in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID')) or not nodelist:
    return None
  num = int(env['SLURM_NTASKS'])
  if num <= 1:
    return None
  # Every task computes the same port from the job id, above Linux's ephemeral range (32768-60999) so that
  # no outgoing connection holds it.
  port = 61000 + int(env['SLURM_JOB_ID']) % 4000
  local = None
  per_node = _tasks_per_node(env)
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d]
  if per_node > 1 and len(visible) != 1:
    # One process per GPU, each seeing the whole node (srun's default): the i-th task on a node drives the
    # i-th GPU. With --gpus-per-task=1 each task sees only its own GPU and needs no choosing.
    local = (int(env.get('SLURM_LOCALID', '0')),)
  return Cluster('slurm', f'{first_host(nodelist)}:{port}', num, int(env['SLURM_PROCID']), local)


def _tasks_per_node(env: Mapping[str, str]) -> int:
  text = env.get('SLURM_NTASKS_PER_NODE') or env.get('SLURM_STEP_TASKS_PER_NODE') or env.get(
      'SLURM_TASKS_PER_NODE', '1')
  digits = ''
  for ch in text:  # '4(x2),3' -> 4: the first node's count
    if not ch.isdigit():
      break
    digits += ch
  return int(digits or 1)


def first_host(nodelist: str) -> str:
  """The first host of a SLURM host list: 'gpu[003-010,012],login1' -> 'gpu003', 'a,b' -> 'a'."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += (ch == '[') - (ch == ']')
    if ch == ',' and depth == 0:
      end = i
      break
  return _first_of(nodelist[:end])


def _first_of(pattern: str) -> str:
  if '[' not in pattern:
    return pattern
  prefix, rest = pattern.split('[', 1)
  inside, suffix = rest.split(']', 1)
  return prefix + inside.split(',')[0].split('-')[0] + _first_of(suffix)


def _on_tpu_pod(env: Mapping[str, str]) -> bool:
  """A TPU VM (libtpu installed, TPU chips attached) or a GKE TPU pod (the TPU webhook's variables)."""
  if env.get('TPU_WORKER_HOSTNAMES') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  import glob
  import importlib.util
  has_chips = os.path.exists('/dev/accel0') or bool(glob.glob('/dev/vfio/[0-9]*'))
  return has_chips and importlib.util.find_spec('libtpu') is not None


# ---------------------------------------------------------------------------------------------------------
# Start-up


def initialize_from_args(args, say=print) -> Cluster | None:
  """Initialise jax.distributed for a command's parsed flags (see add_arguments); call before touching jax."""
  if args.distributed_timeout <= 0:
    raise UserError(f'--distributed_timeout={args.distributed_timeout}: expected a positive number of seconds')
  cluster = resolve(args.coordinator_address, args.num_processes, args.process_id)
  if cluster is not None:
    initialize(cluster, args.distributed_timeout)
    import jax
    if jax.process_index() == 0:
      say(f'jax.distributed ({cluster.source}): {jax.process_count()} processes, '
          f'{jax.device_count()} devices, coordinator {cluster.coordinator_address or "from the TPU metadata"}')
  return cluster


def initialize(cluster: Cluster, timeout_s: float) -> None:
  import jax  # jax.distributed.initialize itself refuses to run once a device has been touched
  start = time.monotonic()
  if cluster.coordinator_address is not None:
    rendezvous(cluster.coordinator_address, cluster.num_processes, cluster.process_id, timeout_s)
  remaining = max(int(timeout_s - (time.monotonic() - start)), 10)
  kwargs = {}
  if cluster.coordinator_address is not None:
    kwargs = dict(coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
                  process_id=cluster.process_id,
                  local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None)
  try:
    # CPU processes (launch/local.sh) need cross-process collectives: gloo is the one built into jaxlib.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, ValueError):  # a jax without the option: its default then
    pass
  try:
    jax.distributed.initialize(initialization_timeout=remaining, **kwargs)
  except (RuntimeError, ValueError) as e:  # TPU metadata missing or malformed: say so in one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'jax.distributed ({cluster.source}) failed to start: {first}') from None


def rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """Return once all `num_processes` processes have checked in with process 0 on `address`'s port, or raise
  a one-line UserError at `timeout_s`. Process 0 listens; the others connect and wait for its go."""
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  if process_id == 0:
    _gather(port, num_processes, deadline, address, timeout_s)
  else:
    _check_in(host, port, num_processes, process_id, deadline, address, timeout_s)


def _gather(port: int, num_processes: int, deadline: float, address: str, timeout_s: float) -> None:
  try:
    if socket.has_dualstack_ipv6():
      server = socket.create_server(('', port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      server = socket.create_server(('', port))
  except OSError as e:
    raise UserError(f'process 0 cannot listen on port {port} of --coordinator_address={address}: '
                    f'{e.strerror}') from None
  joined: dict[int, socket.socket] = {}
  try:
    while len(joined) < num_processes - 1:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = sorted(set(range(1, num_processes)) - set(joined))
        raise UserError(f'only {len(joined) + 1} of {num_processes} processes reached the coordinator {address} '
                        f'within {timeout_s:g}s (--distributed_timeout); missing process ids {_ids(missing)}')
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except (socket.timeout, TimeoutError):
        continue
      conn.settimeout(min(max(deadline - time.monotonic(), 0.1), 5.0))
      try:
        words = _read_line(conn).split()
      except OSError:
        words = []
      if len(words) != 3 or words[0] != _HELLO or not (words[1].isdigit() and words[2].isdigit()):
        conn.close()  # a stray connection (a port scanner, an old run): ignore it
        continue
      pid, count = int(words[1]), int(words[2])
      problem = None
      if count != num_processes:
        problem = f'process {pid} was started with --num_processes={count}, process 0 with {num_processes}'
      elif pid in joined:
        problem = f'two processes were started with --process_id={pid}'
      if problem:
        for c in [conn, *joined.values()]:
          _send(c, f'error {problem}\n')
        raise UserError(problem)
      joined[pid] = conn
    for conn in joined.values():
      _send(conn, 'go\n')
    for conn in joined.values():  # let the others close first, so no TIME_WAIT holds the port jax binds next
      conn.settimeout(2.0)
      try:
        conn.recv(1)
      except OSError:
        pass
  finally:
    for conn in joined.values():
      conn.close()
    server.close()


def _check_in(host: str, port: int, num_processes: int, process_id: int, deadline: float, address: str,
              timeout_s: float) -> None:
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise UserError(f'the coordinator {address} did not answer within {timeout_s:g}s '
                      '(--distributed_timeout): is process 0 running, and is its address reachable from here?')
    try:
      conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
    except OSError:  # refused (not up yet), unreachable, or a name not resolvable yet: retry until the deadline
      time.sleep(min(0.25, max(remaining, 0)))
      continue
    with conn:
      conn.settimeout(max(deadline - time.monotonic(), 0.1))
      try:
        _send(conn, f'{_HELLO} {process_id} {num_processes}\n')
        reply = _read_line(conn)
      except OSError:
        reply = ''
    if reply == 'go':
      return
    if reply.startswith('error '):
      raise UserError(reply[len('error '):])
    time.sleep(0.25)  # the coordinator went away mid-rendezvous (restarted?): try again until the deadline


def _send(conn: socket.socket, text: str) -> None:
  try:
    conn.sendall(text.encode())
  except OSError:
    pass


def _read_line(conn: socket.socket) -> str:
  data = b''
  while not data.endswith(b'\n') and len(data) < 1024:
    chunk = conn.recv(1024)
    if not chunk:
      break
    data += chunk
  return data.decode(errors='replace').strip()


def _ids(ids: list[int]) -> str:
  return ', '.join(map(str, ids[:10])) + (f' and {len(ids) - 10} more' if len(ids) > 10 else '')


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process: what every process must agree on to act at the same step (stop,
  skip a checkpoint). A small all-gather in a multi-process run, so call it at the same point on all."""
  import jax  # imported late here as everywhere in this module: jax.distributed must start first
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))
