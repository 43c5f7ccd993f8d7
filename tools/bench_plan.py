"""How long `llm-jax plan` takes for the llama_1b recipe on 8 fake CPU devices (target: well under a minute
on the 2-core machine), and what it says per mesh: the table BENCHMARKS.md records.

    .venv/bin/python tools/bench_plan.py [--recipe=llama_1b] [--devices=8]

First the command itself, timed end to end in a fresh process (start-up, tracing, compilation); then, in
this process, one plan per mesh of the list below with its compile time and memory per device.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [  # (label, --mesh, extra overrides)
    ('dp: data 8', 'data=8', [('mesh.preset', 'dp')]),
    ('fsdp 8', 'fsdp=8', []),
    ('fsdp 4 x tensor 2', 'fsdp=4,tensor=2', []),
    ('fsdp 4 x sequence 2', 'fsdp=4,sequence=2', []),
    ('fsdp 8, 32 rows', 'fsdp=8', [('data.batch_size', '32')]),
]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--recipe', default='llama_1b')
  p.add_argument('--devices', type=int, default=8)
  args = p.parse_args()
  load = os.getloadavg()[0]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  start = time.perf_counter()
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', 'plan', f'--config={args.recipe}',
                        f'--devices={args.devices}', '--device_kind=v5e'], capture_output=True, text=True,
                       cwd=ROOT, env=env)
  took = time.perf_counter() - start
  if res.returncode not in (0, 1):
    sys.exit(res.stderr)

  import jax
  jax.config.update('jax_num_cpu_devices', args.devices)
  from llm_jax import config as config_lib
  from llm_jax.train import plan
  from llm_jax.commands.plan import mesh_overrides
  import flax
  print(f'python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}; '
        f'{os.cpu_count()} CPUs; load average {load:.1f} -> {os.getloadavg()[0]:.1f}')
  print(f'`llm-jax plan --config={args.recipe} --devices={args.devices}` in a fresh process: {took:.1f} s')
  print()
  print('| mesh | compile s | arguments GiB | temporaries GiB | total GiB | v5e (16 GiB) | H100 (60 GiB for JAX) |')
  print('|---|---|---|---|---|---|---|')
  devices = jax.devices('cpu')[:args.devices]
  for label, mesh, extra in MESHES:
    cfg = config_lib.load(args.recipe, mesh_overrides(mesh) + extra)
    t = time.perf_counter()
    report = plan.make_plan(cfg, devices, None)
    secs = time.perf_counter() - t
    m = report['memory']
    fits = ['fits' if m['total'] <= cap * plan.GiB else 'no' for cap in (16, 60)]
    print(f'| {label} | {secs:.1f} | {m["arguments"] / plan.GiB:.2f} | {m["temporaries"] / plan.GiB:.2f} | '
          f'{m["total"] / plan.GiB:.2f} | {fits[0]} | {fits[1]} |')


if __name__ == '__main__':
  main()
