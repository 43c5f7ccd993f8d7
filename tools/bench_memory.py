"""Compiled memory of the train step under each remat policy and loss chunking: what XLA plans to allocate
for temporaries (activations kept for the backward pass, gradients, logits, ...) beside the arguments (the
state and the batch).

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

from llm_jax import cli, config as config_lib, sharding
from llm_jax.train import plan
from llm_jax.train.step import setup_train_step


def memory(cfg):
  """XLA's memory analysis of the train step exactly as train/loop.py builds it (setup_train_step: loss
  options, microbatches, and LoRA's adapter-only gradient and optimizer state)."""
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  setup = setup_train_step(cfg, mesh, rules)
  batch = plan.abstract_batch(cfg.data, setup.batch_sharding)
  return setup.step.lower(setup.factory.abstract_sharded(), batch).compile().memory_analysis()


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
  print('| remat | loss_chunk | microbatches | temp memory (MiB) | arguments (MiB) |')
  print('|---|---|---|---|---|')
  for remat in args.remat.split(','):
    for chunk in args.loss_chunk.split(','):
      for micro in args.microbatches.split(','):
        cfg = config_lib.load(args.config, [*overrides, ('model.remat', remat), ('train.loss_chunk', chunk),
                                            ('train.microbatches', micro)])
        m = memory(cfg)
        print(f'| {remat} | {chunk} | {micro} | {m.temp_size_in_bytes / 2**20:,.1f} | '
              f'{m.argument_size_in_bytes / 2**20:,.1f} |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
