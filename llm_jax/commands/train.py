"""`llm-jax train`: train a run in --workdir, or resume it from its latest checkpoint."""

from llm_jax import distributed
from llm_jax.commands import common

HELP = 'train (or resume) a run in --workdir'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  common.add_config_flag(p, also="; a run being resumed keeps its saved config")
  distributed.add_arguments(p)


def run(args, overrides) -> int:
  from llm_jax.run import finetune
  from llm_jax.commands.common import nonempty
  from llm_jax.train import loop
  nonempty('--workdir', args.workdir)
  cfg = finetune.resolve_train_config(args.workdir, args.config, overrides)
  distributed.initialize_from_args(args)  # before anything touches a device
  result = loop.train(cfg, args.workdir)
  # Stopped by SIGTERM / SIGINT with a checkpoint: the shell's convention for death by a signal (128 + its
  # number), so a scheduler sees the run as not finished and can requeue it.
  return 128 + result['signum'] if result.get('signum') else 0
