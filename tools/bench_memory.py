"""Compiled memory of the train step under each remat policy and loss chunking: what XLA plans to allocate
for temporaries (activations kept for the backward pass, logits, ...) beside the state and the batch.

These are compile-time figures from `Compiled.memory_analysis()`, not measurements of a running process, so
other work on the machine does not disturb them; they do depend on the backend (CPU here unless a GPU/TPU
is present) and the XLA version.

    python tools/bench_memory.py [--config=tiny] [--config.KEY=VALUE ...] \
        [--remat=none,full,dots_no_batch,save_attention] [--loss_chunk=0,128]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from llm_jax import cli, config as config_lib, sharding
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.loss import LossConfig
from llm_jax.train.state import StateFactory
from llm_jax.train.step import make_train_step


def temp_bytes(cfg) -> int:
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
           for k in ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')}
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh,
                         loss_cfg=LossConfig.from_config(cfg.train), microbatches=cfg.train.microbatches)
  analysis = step.lower(factory.abstract_sharded(), batch).compile().memory_analysis()
  return analysis.temp_size_in_bytes


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--remat', default='none,full,dots_no_batch,save_attention')
  parser.add_argument('--loss_chunk', default='0')
  parser.add_argument('--microbatches', default='1')
  args, extra = parser.parse_known_args(argv)
  overrides = cli.split_config_overrides(extra)
  device = jax.devices()[0]
  print(f'device: {device.device_kind} x {jax.device_count()}, jax {jax.__version__}')
  print('| remat | loss_chunk | microbatches | temp memory (MiB) |')
  print('|---|---|---|---|')
  for remat in args.remat.split(','):
    for chunk in args.loss_chunk.split(','):
      for micro in args.microbatches.split(','):
        cfg = config_lib.load(args.config, [*overrides, ('model.remat', remat), ('train.loss_chunk', chunk),
                                            ('train.microbatches', micro)])
        print(f'| {remat} | {chunk} | {micro} | {temp_bytes(cfg) / 2**20:,.1f} |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
