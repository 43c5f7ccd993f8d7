"""What a checkpoint costs, and what the crash-safety around it adds: for a recipe's full train state, the
time `save` blocks the training loop, the time until the step is committed, the manifest written inside the
commit (checkpoint_files.write_manifest), checking a step against it, and restoring the newest readable step.

    python tools/bench_checkpoint.py [--config=tiny] [--saves=3] [--dir=/tmp/bench_ckpt]
        [--config.model.embed_dim=1024 ...]

One JSON object per line: the state's size, then one per save, then the restore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax

from llm_jax import cli, config as config_lib, sharding
from llm_jax.run import checkpoint_files
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory, param_logical_specs


def _du(path: str) -> tuple[int, int]:
  size = files = 0
  for dirpath, _, names in os.walk(path):
    for name in names:
      size += os.path.getsize(os.path.join(dirpath, name))
      files += 1
  return size, files


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--saves', type=int, default=3)
  parser.add_argument('--dir', default=None, help='where to write (default: a new temporary directory)')
  args, extra = parser.parse_known_args(argv)
  cfg = config_lib.load(args.config, cli.split_config_overrides(extra))
  mesh = sharding.make_mesh(cfg.mesh)
  model = build_model(cfg.model)
  factory = StateFactory(model, optim.make_optimizer(cfg.train, param_logical_specs(model)), mesh,
                         sharding.rules_from_config(cfg.mesh))
  init = jax.jit(factory._init, out_shardings=factory.shardings)
  states = [init(jax.random.PRNGKey(i)) for i in range(min(args.saves, 2))]
  jax.block_until_ready(states)
  leaves = jax.tree.leaves(states[0])
  print(json.dumps({'device': jax.devices()[0].device_kind, 'devices': jax.device_count(), 'jax': jax.__version__,
                    'arrays': len(leaves), 'state_bytes': sum(x.nbytes for x in leaves),
                    'load_average': os.getloadavg()[0]}), flush=True)

  workdir = args.dir or tempfile.mkdtemp(prefix='bench_ckpt_')
  seal_seconds = []
  real = checkpoint_files.write_manifest

  def timed(directory, step):
    t = time.perf_counter()
    real(directory, step)
    seal_seconds.append(time.perf_counter() - t)

  checkpoint_files.write_manifest = timed
  try:
    ckpt = Checkpointer(workdir, keep=2)
    for i in range(args.saves):
      step = i + 1
      t0 = time.perf_counter()
      ckpt.save(step, states[i % len(states)], {'step': step}, cfg.to_dict())
      t1 = time.perf_counter()
      ckpt.wait()
      t2 = time.perf_counter()
      size, files = _du(checkpoint_files.step_dir(ckpt.directory, step))
      t3 = time.perf_counter()
      assert checkpoint_files.check_step(ckpt.directory, step) == (True, None)
      t4 = time.perf_counter()
      print(json.dumps({'save': step, 'blocking_s': round(t1 - t0, 4), 'until_committed_s': round(t2 - t0, 4),
                        'manifest_s': round(seal_seconds[-1], 4), 'check_s': round(t4 - t3, 4),
                        'bytes': size, 'files': files}), flush=True)
    t0 = time.perf_counter()
    step, state, _ = ckpt.restore_latest(factory.abstract_sharded())
    jax.block_until_ready(state)
    print(json.dumps({'restore_latest': step, 'seconds': round(time.perf_counter() - t0, 4)}), flush=True)
    ckpt.close()
  finally:
    checkpoint_files.write_manifest = real
    if args.dir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
