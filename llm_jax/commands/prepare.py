"""`llm-jax prepare`: tokenize a source once into a TFDS ArrayRecord dataset that training reads directly."""

from llm_jax.commands import common
from llm_jax.errors import UserError

HELP = 'pre-tokenize data.source into a TFDS ArrayRecord dataset (train from it with data.source=tfds:DIR)'


def add_arguments(p) -> None:
  p.add_argument('--output', required=True, help='a TFDS data_dir; the dataset goes to OUTPUT/NAME/1.0.0')
  common.add_config_flag(p)
  p.add_argument('--name', default='llm_jax_text', help='the dataset name (tfds:NAME with data.tfds_data_dir)')


def run(args, overrides) -> int:
  import re
  from llm_jax import config as config_lib
  from llm_jax.run import workdir as workdir_lib
  from llm_jax.commands.common import nonempty
  from llm_jax.data import prepared, tokenizer as tokenizer_lib
  nonempty('--output', args.output)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', args.name):
    raise UserError(f'--name={args.name!r}: expected lower_snake_case (a TFDS dataset name)')
  cfg = config_lib.load(args.config or workdir_lib.default_recipe(), overrides)
  if cfg.data.tokenizer:
    tok = tokenizer_lib.load(cfg.data.tokenizer)
  else:
    print('training a tokenizer on the training split (set data.tokenizer to reuse one)', flush=True)
    tok = workdir_lib.train_tokenizer(cfg)
  workdir_lib.check_vocab(tok, cfg)
  result = prepared.prepare(cfg.data, tok, args.output, args.name)
  splits = ', '.join(f'{split} {n:,}' for split, n in result['splits'].items())
  print(f'wrote {result["path"]}: {result["documents"]:,} documents ({splits}), {result["tokens"]:,} tokens, '
        f'{result["skipped"]} bad records skipped')
  print(f'train from it with --config.data.source=tfds:{result["path"]}')
  return 0
