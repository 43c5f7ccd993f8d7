"""`llm-jax index`: an index of the passages of a data source for retrieval (`--retrieve` of generate, chat
and serve).

    llm-jax index --embedder=WORKDIR --data=SOURCE --output=DIR [--append]

SOURCE is anything the training pipeline reads (a glob of .txt / .jsonl files, `builtin`, `tfds:...`).
Documents are cut into passages of --passage_tokens of the embedder's tokens overlapping by --overlap,
embedded, and written with their sources and places (llm_jax/retrieval/index.py). --append adds the
documents not in the index yet, with the embedder the index was built with (another is refused).
"""

from __future__ import annotations

import sys
import time

from llm_jax.commands.common import no_overrides, nonempty
from llm_jax.errors import UserError

HELP = 'index the passages of a data source for retrieval (--retrieve)'


def add_arguments(p) -> None:
  p.add_argument('--embedder', required=True, help='an encoder run that embeds the passages')
  p.add_argument('--data', required=True, help='a data source: a glob of .txt/.jsonl files, builtin, tfds:...')
  p.add_argument('--output', required=True, help='the index directory (new, or an index with --append)')
  p.add_argument('--append', action='store_true', help='add the documents of --data to the index --output')
  p.add_argument('--passage_tokens', type=int, default=None,
                 help="tokens per passage (the embedder's; default 128, or what the embedder reads if less)")
  p.add_argument('--overlap', type=int, default=None,
                 help='tokens shared by neighbouring passages (default 32, at most a quarter of a passage)')
  p.add_argument('--text_field', default='text', help='the field of .jsonl records that holds the text')
  p.add_argument('--txt_mode', default='file', choices=('file', 'blocks'),
                 help='.txt files: one document each, or one per block between blank lines')
  p.add_argument('--batch_size', type=int, default=64, help='passages embedded together')


def _progress(total: int):
  if sys.stderr.isatty():
    from tqdm import tqdm
    bar = tqdm(total=total, unit='passage', dynamic_ncols=True, file=sys.stderr)
    return bar.update
  state = {'done': 0, 'said': 0, 'start': time.monotonic()}

  def update(n: int) -> None:  # a plain line every tenth of the way (logs, CI)
    state['done'] += n
    if state['done'] * 10 // max(total, 1) > state['said'] or state['done'] == total:
      state['said'] = state['done'] * 10 // max(total, 1)
      rate = state['done'] / max(time.monotonic() - state['start'], 1e-9)
      print(f'embedded {state["done"]}/{total} passages ({rate:,.0f}/s)', file=sys.stderr, flush=True)
  return update


def run(args, overrides) -> int:
  no_overrides('index', overrides)
  for flag in ('--embedder', '--data', '--output'):
    nonempty(flag, getattr(args, flag[2:]))
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size}: expected a positive integer')
  from llm_jax.retrieval import build, index as index_lib, passages
  if args.append:
    index_lib.load(args.output, '--output')  # a missing or damaged index fails before the embedder loads
  else:
    build.check_new_output(args.output)
    size = args.passage_tokens if args.passage_tokens is not None else build.DEFAULT_PASSAGE_TOKENS
    passages.check_sizes(size, args.overlap if args.overlap is not None else min(build.DEFAULT_OVERLAP, size // 4),
                         1 << 30)
  from llm_jax.infer import inference
  from llm_jax.run import workdir as workdir_lib
  from llm_jax import models
  models.require_family(workdir_lib.load_config(args.embedder), 'index --embedder', 'embeds',
                        why='passages are embedded by an encoder (model.family=encoder: a BERT run, or a '
                        'sentence-transformers model converted with `llm-jax convert from-hf`)')
  from llm_jax.retrieval import embeddings
  run_ = inference.load_run(args.embedder)
  run_.__dict__['_embedder'] = embeddings.Embedder(run_, args.batch_size)
  say = lambda msg: print(f'llm-jax: {msg}', file=sys.stderr, flush=True)  # noqa: E731
  start = time.monotonic()
  summary = build.build(run_, args.data, args.output, args.passage_tokens, args.overlap, args.append,
                        args.text_field, args.txt_mode, say=say, progress=_progress)
  took = time.monotonic() - start
  print(f'{summary["passages"]:,} passages of {summary["documents"]:,} documents ({summary["dim"]} dimensions) -> '
        f'{args.output} ({summary["total"]:,} passages in all, {took:.1f} s)')
  return 0
