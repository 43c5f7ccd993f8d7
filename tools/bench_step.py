"""Cost and steady-state time of the jitted train step of a recipe, on a synthetic batch.

Prints XLA's compile-time cost analysis (FLOPs, bytes accessed: not disturbed by other jobs on the
machine) and the wall and process-CPU time per step after warm-up. To compare two checkouts, run this file
with each on the import path; it only uses the step API the walking skeleton already had:

    PYTHONPATH=/path/to/checkout python tools/bench_step.py [--config=tiny] [--steps=40]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

import llm_jax
from llm_jax import config as config_lib, sharding
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory, param_logical_specs
from llm_jax.train.step import make_train_step


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--steps', type=int, default=40)
  args = parser.parse_args(argv)
  cfg = config_lib.load(args.config, [])
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train, param_logical_specs(model))
  factory = StateFactory(model, tx, mesh, rules)
  state = factory.init(cfg.seed)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh)
  rng = np.random.default_rng(0)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(4, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((B, T), np.int32),
           'segment_ids': np.ones((B, T), np.int32),
           'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}

  cost = step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  print(f'llm_jax from {llm_jax.__file__}; {jax.devices()[0].device_kind} x {jax.device_count()}, '
        f'jax {jax.__version__}')
  print(f'cost per step: {cost.get("flops", 0) / 1e9:.4f} GFLOP, {cost.get("bytes accessed", 0) / 1e9:.4f} GB '
        'accessed')
  for _ in range(3):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  wall, cpu = (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps
  print(f'time per step: wall {wall * 1000:.1f} ms, process CPU {cpu * 1000:.1f} ms')
  return 0


if __name__ == '__main__':
  sys.exit(main())
