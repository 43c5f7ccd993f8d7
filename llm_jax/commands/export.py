"""`llm-jax export --merge-lora`: a LoRA run's adapters folded into its base, written as a plain workdir.

The output holds config.json (model.lora.rank 0, no init_from), tokenizer.model and a params-only checkpoint
at the run's step, so `eval`, `generate`, `chat` and `serve` read it like any run, and `train` continues from
it with a fresh optimizer (as from imported weights). It is written into OUTPUT.tmp and renamed at the end:
an interrupted export leaves no half-written workdir, and an existing OUTPUT is never touched.
"""

from __future__ import annotations

import os
import shutil

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
  from llm_jax import config as config_lib
  from llm_jax.data import tokenizer as tokenizer_lib
  from llm_jax.infer import inference
  from llm_jax.run import lora
  from llm_jax.run.checkpoint import Checkpointer
  run_ = inference.load_run(args.workdir)
  merged = lora.merged(run_.params, cfg.model)
  plain = ml_collections.ConfigDict(cfg.to_dict())
  plain.model.lora.rank = 0
  plain.init_from = ''
  plain = config_lib.load(None, base=plain)
  tmp = out + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    config_lib.write_json_atomic(plain, workdir_lib.config_path(tmp))
    tokenizer_lib.write_files(run_.tokenizer, tmp)  # tokenizer.model, or tokenizer.json and its config
    ckpt = Checkpointer(tmp, async_save=False)
    ckpt.save_params(run_.step, merged, plain.to_dict())
    ckpt.close()
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f'cannot write --output={args.output}: {e.strerror}') from None
  except UserError:  # a checkpoint write that failed (disk full, read-only): nothing half-written is left
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(tmp, out)
  print(f'wrote {args.output}: step {run_.step} of {args.workdir} with its adapters merged '
        f'(rank {cfg.model.lora.rank} on {", ".join(cfg.model.lora.targets)})')
  return 0
