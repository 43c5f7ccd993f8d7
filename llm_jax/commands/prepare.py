"""`llm-jax prepare`: tokenize a source once into a TFDS ArrayRecord dataset that training reads directly,
`data.workers` processes tokenizing, with a progress bar (documents, bytes and tokens per second)."""

import sys
import time

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
  progress = Progress()
  result = prepared.prepare(cfg.data, tok, args.output, args.name, on_progress=progress)
  progress.close()
  splits = ', '.join(f'{split} {n:,}' for split, n in result['splits'].items())
  print(f'wrote {result["path"]}: {result["documents"]:,} documents ({splits}), {result["tokens"]:,} tokens, '
        f'{result["skipped"]} bad records skipped')
  print(f'train from it with --config.data.source=tfds:{result["path"]}')
  return 0


class Progress:
  """A tqdm bar on an interactive terminal; otherwise a plain line every EVERY seconds (logs, CI), and the
  rates once at the end either way."""

  EVERY = 30.0

  def __init__(self, interactive: bool | None = None):
    self._interactive = sys.stdout.isatty() if interactive is None else interactive
    self._start = self._last = time.perf_counter()
    self._bar = None
    self._stats = None

  def _rates(self, stats, now: float) -> str:
    elapsed = max(now - self._start, 1e-9)
    return (f'{stats["read"] / elapsed:,.0f} docs/s, {stats["bytes"] / elapsed / 1e6:,.2f} MB/s, '
            f'{stats["tokens"] / elapsed:,.0f} tokens/s')

  def __call__(self, stats: dict) -> None:
    self._stats = stats
    now = time.perf_counter()
    if self._interactive:
      if self._bar is None:
        from tqdm import tqdm
        self._bar = tqdm(total=stats['total'], unit='doc', dynamic_ncols=True)
      self._bar.n = stats['read']
      if now - self._last >= 0.5 or stats['read'] == stats['total']:
        self._last = now
        self._bar.set_postfix_str(f'{stats["bytes"] / 1e6:,.1f} MB, {self._rates(stats, now)}', refresh=False)
        self._bar.refresh()
    elif now - self._last >= self.EVERY:
      self._last = now
      print(f'prepare: {stats["read"]:,} of {stats["total"]:,} documents, {self._rates(stats, now)}', flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._stats is not None:
      now = time.perf_counter()
      print(f'tokenized {self._stats["bytes"] / 1e6:,.1f} MB in {now - self._start:,.1f} s: '
            f'{self._rates(self._stats, now)}', flush=True)
