"""Multi-host start-up: where the job's shape comes from (flags, SLURM, TPU), the rendezvous, and one-line
errors within the timeout when the coordinator never answers or a process never comes."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, TINY
from llm_jax import distributed
from llm_jax.distributed import Cluster
from llm_jax.errors import UserError


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


SLURM = {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '16', 'SLURM_PROCID': '9', 'SLURM_LOCALID': '1',
         'SLURM_STEP_NODELIST': 'gpu[007-008],gpu[010-011]', 'SLURM_NTASKS_PER_NODE': '4'}


def test_flags_give_the_cluster_and_one_process_needs_none():
  assert distributed.resolve('10.0.0.1:1234', 4, 3, env={}) == Cluster('flags', '10.0.0.1:1234', 4, 3)
  assert distributed.resolve(None, None, None, env={}) is None
  assert distributed.resolve(None, 1, None, env=SLURM) is None  # --num_processes=1 opts out, even in SLURM
  with pytest.raises(UserError, match='--coordinator_address also needs --num_processes, --process_id'):
    distributed.resolve('10.0.0.1:1234', None, None, env={})
  with pytest.raises(UserError, match=r'--process_id=4: expected 0 to 3 \(--num_processes=4\)'):
    distributed.resolve('10.0.0.1:1234', 4, 4, env={})
  with pytest.raises(UserError, match="--coordinator_address='10.0.0.1': expected host:port"):
    distributed.resolve('10.0.0.1', 2, 0, env={})
  assert distributed.split_address('[::1]:8476') == ('::1', 8476)


def test_slurm_variables_give_the_cluster():
  # One process per GPU (4 per node), each seeing every GPU of its node: the task's local id picks its GPU.
  c = distributed.resolve(None, None, None, env=SLURM)
  assert c == Cluster('slurm', f'gpu007:{61000 + 4242 % 4000}', 16, 9, (1,))
  # --gpus-per-task=1: the task sees only its own GPU, nothing to pick.
  assert distributed.resolve(None, None, None, env={**SLURM, 'CUDA_VISIBLE_DEVICES': '1'}).local_device_ids is None
  # One process per node: it drives every GPU of the node.
  per_node = {**SLURM, 'SLURM_NTASKS': '4', 'SLURM_PROCID': '2', 'SLURM_NTASKS_PER_NODE': '1'}
  assert distributed.resolve(None, None, None, env=per_node).local_device_ids is None
  # A flag overrides one value and SLURM gives the rest.
  c = distributed.resolve('head:9999', None, None, env=SLURM)
  assert (c.source, c.coordinator_address, c.num_processes, c.process_id) == ('flags', 'head:9999', 16, 9)
  # The batch script's own shell (one task) is not a multi-process job.
  assert distributed.resolve(None, None, None, env={**SLURM, 'SLURM_NTASKS': '1'}) is None


@pytest.mark.parametrize('nodelist,first', [
    ('node001', 'node001'), ('node001,node002', 'node001'), ('gpu[003-010,012],login1', 'gpu003'),
    ('gpu[12,3-5]', 'gpu12'), ('rack[1-2]-node[04-05]', 'rack1-node04'), ('a-[7]', 'a-7'),
])
def test_first_host_of_a_slurm_host_list(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_tpu_pods_are_left_to_jax():
  assert distributed.resolve(None, None, None, env={'TPU_WORKER_HOSTNAMES': 'h0,h1'}) == Cluster('tpu')


def test_rendezvous_returns_when_every_process_checked_in():
  port, n = free_port(), 3
  errors, done = [], []

  def proc(pid, delay):
    time.sleep(delay)  # processes start in any order, the coordinator last here
    try:
      distributed.rendezvous(f'127.0.0.1:{port}', n, pid, timeout_s=20)
      done.append(pid)
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)
  threads = [threading.Thread(target=proc, args=(pid, d)) for pid, d in ((1, 0), (2, 0.2), (0, 0.5))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert not errors and sorted(done) == [0, 1, 2]
  # The port is free again for jax's own coordinator.
  with socket.create_server(('', port)):
    pass


@pytest.mark.parametrize('second,needle', [
    ((1, 3), 'two processes were started with --process_id=1'),
    ((2, 4), 'process 2 was started with --num_processes=4, process 0 with 3'),
])
def test_rendezvous_refuses_inconsistent_processes(second, needle):
  port = free_port()
  errors = {}

  def proc(name, pid, n):
    try:
      distributed.rendezvous(f'127.0.0.1:{port}', n, pid, timeout_s=10)
    except UserError as e:
      errors[name] = str(e)
  threads = [threading.Thread(target=proc, args=('coordinator', 0, 3)),
             threading.Thread(target=proc, args=('first', 1, 3))]
  threads[0].start()
  threads[1].start()
  time.sleep(0.5)
  threads.append(threading.Thread(target=proc, args=('second', *second)))
  threads[-1].start()
  for t in threads:
    t.join(20)
  assert errors['coordinator'] == needle and errors['second'] == needle


def _train(*flags, timeout=120):
  env = dict(os.environ, PYTHONWARNINGS='ignore')
  start = time.monotonic()
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', 'train', f'--config={TINY}', *flags],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
  return res, time.monotonic() - start


def test_a_coordinator_that_never_answers_is_one_line_within_the_timeout(tmp_path):
  port = free_port()
  res, took = _train(f'--workdir={tmp_path / "run"}', f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', '--process_id=1', '--distributed_timeout=2')
  assert res.returncode == 2, res.stderr
  assert res.stderr.strip() == (f'llm-jax: error: the coordinator 127.0.0.1:{port} did not answer within 2s '
                                '(--distributed_timeout): is process 0 running, and is its address reachable '
                                'from here?')
  assert took < 30  # 2 s of waiting plus start-up, never jax's 5 minutes
  assert not (tmp_path / 'run').exists()


def test_a_process_that_never_comes_is_named_by_the_coordinator(tmp_path):
  port = free_port()
  res, _ = _train(f'--workdir={tmp_path / "run"}', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=3', '--process_id=0', '--distributed_timeout=1.5')
  assert res.returncode == 2
  assert res.stderr.strip() == (f'llm-jax: error: only 1 of 3 processes reached the coordinator 127.0.0.1:{port} '
                                'within 1.5s (--distributed_timeout); missing process ids 1, 2')


SLURM_WORKER = r'''
import argparse
from llm_jax import distributed
parser = argparse.ArgumentParser()
distributed.add_arguments(parser)
cluster = distributed.initialize_from_args(parser.parse_args(['--distributed_timeout=60']), say=lambda _: None)
import jax
print('RESULT', cluster.source, jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
'''


def test_two_processes_join_from_slurm_variables_alone():
  # srun's environment, faked: two tasks of one job on this host; no flags at all.
  for job in range(1000, 5000):
    port = 61000 + job % 4000
    try:
      with socket.create_server(('', port)):
        break
    except OSError:
      continue
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             SLURM_JOB_ID=str(job), SLURM_NTASKS='2', SLURM_STEP_NODELIST='localhost', PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, '-c', SLURM_WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID='0'))
           for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    [line] = [l for l in out.splitlines() if l.startswith('RESULT ')]
    results.append(line.split()[1:])
  assert results == [['slurm', '0', '2', '4'], ['slurm', '1', '2', '4']]
