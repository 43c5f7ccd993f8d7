"""`llm-jax embed`: sentence embeddings of texts by an encoder run.

Texts come from `--text` (repeatable), `--input` (one text per line; a `.jsonl` file gives each record's
`--text_field`; `-` is standard input), or standard input. Output: one JSON object per text on standard
output (`{"index", "embedding"}`), or `--output=FILE.safetensors` (one float32 tensor "embeddings" of
[texts, width]) or `--output=FILE.jsonl`.
"""

from __future__ import annotations

import json
import sys

from llm_jax.commands.common import check_output, no_overrides, nonempty, write_jsonl
from llm_jax.errors import UserError

HELP = 'sentence embeddings of texts by an encoder run'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True, help='an encoder run (ours, or converted with convert from-hf)')
  p.add_argument('--text', action='append', default=None, help='a text (repeatable)')
  p.add_argument('--input', default=None, help='one text per line, or .jsonl records; - is standard input')
  p.add_argument('--text_field', default='text', help='the field of .jsonl records that holds the text')
  p.add_argument('--output', default=None, help='FILE.safetensors or FILE.jsonl (default: JSON lines on stdout)')
  p.add_argument('--batch_size', type=int, default=32, help='texts embedded together')


def read_texts(args) -> list[str]:
  if args.text is not None and args.input is not None:
    raise UserError('give --text or --input, not both')
  if args.text is not None:
    for t in args.text:
      if not t.strip():
        raise UserError('--text is empty')
    return list(args.text)
  if args.input is None and sys.stdin.isatty():
    raise UserError('no text: give --text=TEXT, --input=FILE, or texts on standard input')
  if args.input in (None, '-'):
    name = 'standard input'
    try:
      lines = sys.stdin.read().splitlines()
    except UnicodeDecodeError:
      raise UserError('standard input is not UTF-8 text') from None
  else:
    name = args.input
    try:
      with open(args.input, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise UserError(f'cannot read --input={args.input}: {e.strerror}') from None
    except UnicodeDecodeError:
      raise UserError(f'--input={args.input} is not UTF-8 text') from None
  texts = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if name.endswith('.jsonl'):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{name}:{lineno}: not valid JSON ({e.msg})') from None
      if not isinstance(record, dict) or not isinstance(record.get(args.text_field), str):
        raise UserError(f'{name}:{lineno}: expected an object with a string "{args.text_field}"')
      line = record[args.text_field]
    texts.append(line)
  if not texts:
    raise UserError(f'{name} holds no texts')
  return texts


def run(args, overrides) -> int:
  no_overrides('embed', overrides)
  nonempty('--workdir', args.workdir)
  check_output('--output', args.output)
  if args.output and not args.output.endswith(('.safetensors', '.jsonl')):
    raise UserError(f'--output={args.output}: expected a .safetensors or .jsonl file')
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size}: expected a positive integer')
  from llm_jax.infer import inference
  from llm_jax.run import workdir as workdir_lib
  from llm_jax import models
  models.require_family(workdir_lib.load_config(args.workdir), 'embed', 'embeds',
                        why='sentence embeddings come from an encoder (model.family=encoder)')
  texts = read_texts(args)
  from llm_jax.retrieval import embeddings
  run_ = inference.load_run(args.workdir)
  run_.__dict__['_embedder'] = embeddings.Embedder(run_, args.batch_size)
  vectors = run_.embed(texts)
  if args.output and args.output.endswith('.safetensors'):
    from safetensors.numpy import save_file
    import os
    tmp = f'{args.output}.tmp{os.getpid()}'
    try:
      save_file({'embeddings': vectors}, tmp, metadata={'workdir': args.workdir, 'step': str(run_.step)})
      os.replace(tmp, args.output)
    except OSError as e:
      raise UserError(f'cannot write {args.output}: {e.strerror}') from None
    return 0
  records = ({'index': i, 'embedding': [round(float(x), 7) for x in v]} for i, v in enumerate(vectors))
  if args.output:
    write_jsonl(args.output, records)
  else:
    for r in records:
      print(json.dumps(r))
  return 0
