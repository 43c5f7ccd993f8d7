"""`llm-jax export --merge-lora`: a LoRA run's adapters folded into its base, written as a plain workdir.

The output holds config.json (model.lora.rank 0, no init_from), tokenizer.model and a params-only checkpoint
at the run's step, so `eval`, `generate`, `chat` and `serve` read it like any run, and `train` continues from
it with a fresh optimizer (as from imported weights). It is written beside OUTPUT and renamed at the end (run/writer.py):
an interrupted export leaves no half-written workdir, and an existing OUTPUT is never touched.
"""

from __future__ import annotations

import os

from llm_jax import distributed
from llm_jax.commands.common import no_overrides
from llm_jax.errors import UserError

HELP = "write a LoRA run with its adapters merged into the weights (--merge-lora) as a new workdir"


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', required=True, help='the new workdir (must not exist)')
  p.add_argument('--merge-lora', '--merge_lora', dest='merge_lora', action='store_true',
                 help='fold W + A B * alpha / rank into each adapted projection')
  distributed.add_arguments(p)


def run(args, overrides) -> int:
  no_overrides('export', overrides)
  if not args.merge_lora:
    raise UserError('export: give --merge-lora (merging adapters is the only export there is)')
  from llm_jax.run import workdir as workdir_lib
  cfg = workdir_lib.load_config(args.workdir)
  if not cfg.model.lora.rank:
    raise UserError(f'export --merge-lora: workdir {args.workdir} has no LoRA adapters (model.lora.rank=0)')
  out = os.path.abspath(args.output)
  if os.path.exists(out):
    raise UserError(f'--output={args.output} already exists; give a new directory')
  if not os.path.isdir(os.path.dirname(out)):
    raise UserError(f'--output={args.output}: the directory {os.path.dirname(out)} does not exist')
  distributed.initialize_from_args(args)
  import ml_collections
  from llm_jax import config as config_lib, sharding
  from llm_jax.run import params as params_lib, writer
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  step, merged = params_lib.restore(args.workdir, mesh, rules, cfg, merge_lora=True)
  plain = ml_collections.ConfigDict(cfg.to_dict())
  plain.model.lora.rank = 0
  plain.init_from = ''
  plain = config_lib.load(None, base=plain)
  writer.write_run(args.output, plain, merged, step, workdir_lib.load_tokenizer(args.workdir, cfg))
  print(f'wrote {args.output}: step {step} of {args.workdir} with its adapters merged '
        f'(rank {cfg.model.lora.rank} on {", ".join(cfg.model.lora.targets)})')
  return 0
