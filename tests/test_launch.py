"""The launch scripts: every --dry-run prints the commands the real run would execute, correctly quoted;
bad flags are one line; the GKE manifest is valid YAML of the right shape."""

import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

LAUNCH = os.path.join(ROOT, 'launch')


def _run(*args, env=None):
  return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60,
                        env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize('script', ['local.sh', 'tpu_pod.sh', 'slurm_gpu.sbatch'])
def test_scripts_parse(script):
  assert _run('bash', '-n', os.path.join(LAUNCH, script)).returncode == 0


def test_local_dry_run_prints_one_command_per_process():
  res = _run(os.path.join(LAUNCH, 'local.sh'), '--dry-run', '--devices_per_process=4', '--port=4321',
             '--log_dir=/tmp/l', '3', '--', 'llm-jax', 'train', '--workdir=runs/a b')
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert lines[0] == 'mkdir -p /tmp/l' and lines[-1] == 'wait' and len(lines) == 5
  for i, line in enumerate(lines[1:4]):
    words = shlex.split(line)
    assert words[:3] == ['env', 'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=4']
    assert words[3:6] == ['llm-jax', 'train', '--workdir=runs/a b']
    assert words[6:9] == ['--coordinator_address=127.0.0.1:4321', '--num_processes=3', f'--process_id={i}']
    assert words[9:] == ['>', f'/tmp/l/process_{i}.log', '2>&1', '&']


@pytest.mark.parametrize('args,needle', [
    (['x', '--', 'llm-jax'], "the number of processes must be a positive integer, got 'x'"),
    (['2', 'llm-jax'], 'expected -- and the command after the number of processes'),
    (['--bogus', '2', '--', 'llm-jax'], 'unknown flag --bogus'),
])
def test_local_bad_flags(args, needle):
  res = _run(os.path.join(LAUNCH, 'local.sh'), *args)
  assert res.returncode == 2 and res.stderr.strip() == f'launch/local.sh: error: {needle}'


def test_tpu_pod_dry_run_creates_ships_sets_up_runs_fetches_and_deletes():
  train = ['llm-jax', 'train', '--config=llama_1b', '--workdir=/mnt/runs/a',
           "--config.data.source=it's *.txt"]
  res = _run(os.path.join(LAUNCH, 'tpu_pod.sh'), '--dry-run', '--name=pod1', '--zone=us-west4-a',
             '--project=proj', '--create', '--accelerator=v5litepod-16', '--version=v2-alpha-tpuv5-lite', '--spot',
             '--delete', '--', *train)
  assert res.returncode == 0, res.stderr
  cmds = [shlex.split(l) for l in res.stdout.splitlines() if not l.startswith('#')]
  where = ['--zone=us-west4-a', '--project=proj']
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  assert cmds[0] == tpu + ['describe', 'pod1'] + where
  assert cmds[1] == tpu + ['create', 'pod1'] + where + ['--accelerator-type=v5litepod-16',
                                                      '--version=v2-alpha-tpuv5-lite', '--spot']
  assert cmds[2][:2] == ['git', '-C'] and cmds[2][3:] == ['archive', '--format=tar.gz', '-o', cmds[3][5], 'HEAD']
  assert cmds[3][4:5] + cmds[3][6:] == ['scp', 'pod1:~/llm-jax.tar.gz'] + where + ['--worker=all']
  ssh = [c for c in cmds if c[4:5] == ['ssh']]
  assert len(ssh) == 2 and all(c[5:9] == ['pod1'] + where + ['--worker=all'] for c in ssh)
  setup, run = ssh[0][9], ssh[1][9]
  assert setup.startswith('--command=') and ".venv/bin/pip install -q -e '.[tpu]'" in setup
  # The training command survives two rounds of quoting intact, runs from the venv, and is logged per worker.
  remote = run[len('--command='):]
  assert remote.startswith('cd ~/llm-jax && mkdir -p logs && ')
  body = remote[len('cd ~/llm-jax && mkdir -p logs && '):remote.index(' 2>&1 | tee logs/$(hostname).log')]
  assert shlex.split(body) == ['.venv/bin/llm-jax'] + train[1:]
  assert cmds[-3] == ['mkdir', '-p', 'logs/pod1']
  assert cmds[-2] == tpu + ['scp', 'pod1:~/llm-jax/logs/*', 'logs/pod1/'] + where + ['--worker=all']
  assert cmds[-1] == tpu + ['delete', 'pod1'] + where + ['--quiet']


def test_tpu_pod_with_a_wheel_and_bad_flags():
  res = _run(os.path.join(LAUNCH, 'tpu_pod.sh'), '--dry-run', '--name=p', '--zone=z', '--wheel=dist/x-0.1-py3-none-any.whl',
             '--', 'llm-jax', 'train')
  cmds = [shlex.split(l) for l in res.stdout.splitlines()]
  assert cmds[1][4:6] == ['scp', 'dist/x-0.1-py3-none-any.whl'] and not any('git' in c for c in cmds)
  assert '"$HOME/x-0.1-py3-none-any.whl[tpu]"' in cmds[2][-1]
  res = _run(os.path.join(LAUNCH, 'tpu_pod.sh'), '--name=p', '--zone=z', '--create', '--', 'llm-jax')
  assert res.returncode == 2 and res.stderr.strip() == 'launch/tpu_pod.sh: error: --create needs --accelerator and --version'


@pytest.mark.parametrize('per,tasks', [('gpu', 8), ('node', 1)])
def test_slurm_dry_run_starts_one_process_per_gpu_or_node(per, tasks):
  res = _run('bash', os.path.join(LAUNCH, 'slurm_gpu.sbatch'), '--dry-run', '--nodes=2', '--gpus_per_node=8',
             f'--per={per}', '--', 'llm-jax', 'train', '--workdir=/shared/a b')
  assert res.returncode == 0, res.stderr
  mkdir, srun = res.stdout.splitlines()
  assert mkdir == 'mkdir -p logs'
  assert shlex.split(srun) == ['srun', '--nodes=2', f'--ntasks-per-node={tasks}', '--gpus-per-node=8',
                               '--kill-on-bad-exit=1', '--output=logs/%x-%j-%t.out', '.venv/bin/llm-jax', 'train',
                               '--workdir=/shared/a b']
  # Inside an allocation the sizes come from SLURM.
  res = _run('bash', os.path.join(LAUNCH, 'slurm_gpu.sbatch'), '--dry-run', '--', 'llm-jax', 'train',
             env={'SLURM_JOB_NUM_NODES': '3', 'SLURM_GPUS_ON_NODE': '4'})
  assert '--nodes=3 --ntasks-per-node=4 --gpus-per-node=4' in res.stdout
  res = _run('bash', os.path.join(LAUNCH, 'slurm_gpu.sbatch'), '--dry-run', '--', 'llm-jax', 'train',
             env={'SLURM_JOB_NUM_NODES': '', 'SLURM_GPUS_ON_NODE': ''})
  assert res.returncode == 2 and 'number of nodes unknown' in res.stderr


def _jobset(*args):
  res = _run(sys.executable, os.path.join(LAUNCH, 'gke', 'jobset.py'), '--dry-run', '--name=llama1b',
             '--image=img:1', *args)
  return res


@pytest.mark.parametrize('tpu,topology,slices,hosts,chips', [
    ('v5e', '4x4', 2, 4, 4), ('v5e', '2x4', 1, 1, 8), ('v4', '2x2x4', 1, 4, 4), ('v5p', '4x4x4', 3, 16, 4),
])
def test_gke_jobset_is_valid_yaml_with_one_pod_per_host(tpu, topology, slices, hosts, chips):
  res = _jobset(f'--tpu={tpu}', f'--topology={topology}', f'--slices={slices}', '--', 'llm-jax', 'train',
                '--workdir=/gcs/b/run', '--config.data.source=a: b')
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines()[0] == '# kubectl apply -f ' + os.path.join(os.environ.get('TMPDIR', '/tmp'),
                                                                           'llama1b.jobset.yaml')
  doc = yaml.safe_load(res.stdout)
  assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and doc['kind'] == 'JobSet'
  assert doc['metadata']['annotations'] == {
      'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}
  [rjob] = doc['spec']['replicatedJobs']
  assert rjob['replicas'] == slices
  job = rjob['template']['spec']
  assert job['parallelism'] == job['completions'] == hosts and job['completionMode'] == 'Indexed'
  pod = job['template']['spec']
  assert pod['hostNetwork'] is True and pod['dnsPolicy'] == 'ClusterFirstWithHostNet'
  assert pod['nodeSelector']['cloud.google.com/gke-tpu-topology'] == topology
  [container] = pod['containers']
  assert container['resources']['limits'] == {'google.com/tpu': chips}
  want = ['llm-jax', 'train', '--workdir=/gcs/b/run', '--config.data.source=a: b']
  assert container['command'] == want + ([f'--config.mesh.dcn_data={slices}'] if slices > 1 else [])


@pytest.mark.parametrize('args,needle', [
    (['--tpu=v9', '--topology=4x4', '--', 'llm-jax'], '--tpu=v9: expected one of v4, v5e, v5p, v6e'),
    (['--tpu=v4', '--topology=4x4', '--', 'llm-jax'], '--topology=4x4: v4 slices have 3 dimensions'),
    (['--tpu=v5e', '--topology=4xq', '--', 'llm-jax'], '--topology=4xq: expected sizes joined by x, e.g. 4x4 or 2x2x4'),
    (['--tpu=v5e', '--topology=4x4'], 'no command after --'),
])
def test_gke_bad_flags(args, needle):
  res = _jobset(*args)
  assert res.returncode == 2 and res.stderr.strip() == f'launch/gke/jobset.py: error: {needle}'
