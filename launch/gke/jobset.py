#!/usr/bin/env python3
"""Train on TPU slices in a GKE cluster: a JobSet with one Job per slice and one pod per TPU VM host, each
running the same llm-jax command, rendered from flags and applied with kubectl.

    python3 launch/gke/jobset.py --name=llama1b --image=IMAGE --tpu=v5e --topology=4x4 [--slices=2] \\
        [--dry-run] -- llm-jax train --config=llama_1b --workdir=/gcs/bucket/runs/a

The image must hold this checkout installed with its [tpu] extra; the workdir must be storage every pod
sees (a gcsfuse or Filestore mount). llm-jax finds its peers by itself: GKE's TPU webhook gives every pod
the slice's hosts (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID) and, for several slices, the MEGASCALE_*
coordinates that jax.distributed reads. With --slices > 1, `llm-jax train` also gets
--config.mesh.dcn_data=<slices> (data parallel across slices over the data-center network) unless the
command sets a DCN axis itself.

--dry-run prints the manifest and the kubectl command instead of applying it. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile

# GKE's accelerator label per TPU generation, and how many chips one host (one pod) drives.
TPUS = {
    'v4': ('tpu-v4-podslice', 4),
    'v5e': ('tpu-v5-lite-podslice', 4),
    'v5p': ('tpu-v5p-slice', 4),
    'v6e': ('tpu-v6e-slice', 4),
}
SINGLE_HOST_CHIPS = {'v5e': 8, 'v6e': 8, 'v4': 4, 'v5p': 4}  # up to this many chips fit on one host


class Error(Exception):
  pass


def hosts_and_chips(tpu: str, topology: str) -> tuple[int, int]:
  """(hosts per slice, chips per host) of a slice such as v5e 4x4 (4 hosts of 4 chips)."""
  if tpu not in TPUS:
    raise Error(f'--tpu={tpu}: expected one of {", ".join(TPUS)}')
  try:
    dims = [int(d) for d in topology.lower().split('x')]
  except ValueError:
    raise Error(f'--topology={topology}: expected sizes joined by x, e.g. 4x4 or 2x2x4') from None
  if not dims or min(dims) < 1 or len(dims) != (3 if tpu in ('v4', 'v5p') else 2):
    raise Error(f'--topology={topology}: {tpu} slices have {3 if tpu in ("v4", "v5p") else 2} dimensions')
  chips = math.prod(dims)
  if chips <= SINGLE_HOST_CHIPS[tpu]:
    return 1, chips
  per_host = TPUS[tpu][1]
  return chips // per_host, per_host


def training_command(command: list[str], slices: int) -> list[str]:
  if slices > 1 and command[:2] == ['llm-jax', 'train'] and not any('mesh.dcn_' in a for a in command):
    return command + [f'--config.mesh.dcn_data={slices}']
  return command


def manifest(name: str, image: str, tpu: str, topology: str, slices: int, command: list[str],
             max_restarts: int = 0) -> dict:
  hosts, chips = hosts_and_chips(tpu, topology)
  container = {
      'name': 'llm-jax',
      'image': image,
      'command': training_command(command, slices),
      # The TPU runtime's port, and jax.distributed's coordinator on TPU (jax/_src/clusters/cloud_tpu_cluster.py).
      'ports': [{'containerPort': 8471}, {'containerPort': 8482}],
      'securityContext': {'privileged': True},
      'resources': {'limits': {'google.com/tpu': chips}},
  }
  pod = {
      'hostNetwork': True,
      'dnsPolicy': 'ClusterFirstWithHostNet',
      'nodeSelector': {'cloud.google.com/gke-tpu-accelerator': TPUS[tpu][0],
                       'cloud.google.com/gke-tpu-topology': topology},
      'restartPolicy': 'Never',
      'containers': [container],
  }
  job = {'parallelism': hosts, 'completions': hosts, 'backoffLimit': 0, 'completionMode': 'Indexed',
         'template': {'spec': pod}}
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2',
      'kind': 'JobSet',
      # One slice per node pool: the pods of a Job land on the hosts of one slice.
      'metadata': {'name': name,
                   'annotations': {'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}},
      'spec': {'failurePolicy': {'maxRestarts': max_restarts},
               'replicatedJobs': [{'name': 'slice', 'replicas': slices, 'template': {'spec': job}}]},
  }


def to_yaml(value, indent: int = 0) -> str:
  """A small YAML writer for dicts, lists, strings, numbers and booleans: strings are JSON-quoted (JSON's
  double-quoted strings are YAML's), so no value is ever misread as another type."""
  pad = '  ' * indent
  if isinstance(value, dict):
    lines = []
    for k, v in value.items():
      if isinstance(v, (dict, list)) and v:
        lines.append(f'{pad}{k}:\n{to_yaml(v, indent + 1)}')
      else:
        lines.append(f'{pad}{k}: {_scalar(v)}')
    return '\n'.join(lines)
  if isinstance(value, list):
    lines = []
    for v in value:
      if isinstance(v, (dict, list)) and v:
        inner = to_yaml(v, indent + 1)
        lines.append(f'{pad}- {inner.lstrip()}')
      else:
        lines.append(f'{pad}- {_scalar(v)}')
    return '\n'.join(lines)
  return pad + _scalar(value)


def _scalar(v) -> str:
  if isinstance(v, bool):
    return 'true' if v else 'false'
  if isinstance(v, (int, float)):
    return str(v)
  if isinstance(v, dict):
    return '{}'
  if isinstance(v, list):
    return '[]'
  return json.dumps(str(v))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = []
  if '--' in argv:
    i = argv.index('--')
    argv, command = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(prog='launch/gke/jobset.py', description=__doc__.split('\n\n')[0])
  p.add_argument('--name', required=True, help='JobSet name (lowercase letters, digits, -)')
  p.add_argument('--image', required=True, help='container image with llm-jax[tpu] installed')
  p.add_argument('--tpu', required=True, help=f'TPU generation: {", ".join(TPUS)}')
  p.add_argument('--topology', required=True, help='slice topology, e.g. 4x4 (v5e) or 2x2x4 (v4, v5p)')
  p.add_argument('--slices', type=int, default=1, help='slices (multi-slice over DCN when > 1)')
  p.add_argument('--max_restarts', type=int, default=0, help='JobSet restarts after a failure')
  p.add_argument('--output', default=None, help='also write the manifest to this file')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='print the manifest and the kubectl command instead of applying it')
  args = p.parse_args(argv)
  try:
    if not command:
      raise Error('no command after --')
    if args.slices < 1:
      raise Error(f'--slices={args.slices}: expected a positive integer')
    doc = manifest(args.name, args.image, args.tpu, args.topology, args.slices, command, args.max_restarts)
  except Error as e:
    print(f'launch/gke/jobset.py: error: {e}', file=sys.stderr)
    return 2
  text = to_yaml(doc) + '\n'
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text)
  path = args.output or os.path.join(tempfile.gettempdir(), f'{args.name}.jobset.yaml')
  kubectl = ['kubectl', 'apply', '-f', path]
  if args.dry_run:
    print(f'# {shlex.join(kubectl)}')
    print(text, end='')
    return 0
  if not args.output:
    with open(path, 'w') as f:
      f.write(text)
  print(shlex.join(kubectl), file=sys.stderr)
  return subprocess.call(kubectl)


if __name__ == '__main__':
  sys.exit(main())
