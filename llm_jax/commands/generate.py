"""`llm-jax generate`: continue prompts with a run's latest checkpoint (sampling or beam search).

Prompts come from `--prompt`, from `--prompts_file` (one prompt per line; a line that is a JSON object gives
its `prompt` field, and a `.jsonl` file must be all such lines; `-` is standard input), or from standard
input when neither is given. Output is the text, or with `--jsonl` / `--output` one JSON object per
completion: the prompt's index, the sample, the text, the new tokens and the finish reason.

With `--retrieve=INDEX_DIR` the `--retrieve_k` passages of the index nearest to each prompt are put before
it (llm_jax/retrieval/context.py: the template, trimmed to fit the context); the JSON lines list them under
`passages` and the text output names their sources.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from llm_jax import distributed
from llm_jax.commands.common import (add_retrieve_arguments, check_output, check_retrieve, no_overrides, nonempty,
                                     write_jsonl)
from llm_jax.errors import UserError

HELP = 'continue prompts with the latest checkpoint'
DEFAULT_NEW_TOKENS = 64


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--prompt', default=None, help='one prompt (else --prompts_file, else standard input)')
  p.add_argument('--prompts_file', default=None, help='one prompt per line, or JSONL with "prompt"; - is stdin')
  p.add_argument('--max_new_tokens', type=int, default=None,
                 help='default 64 (an encoder-decoder: at most its data.target_len)')
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top_k', type=int, default=0, help='0 is off')
  p.add_argument('--top_p', type=float, default=1.0, help='1 is off')
  p.add_argument('--min_p', type=float, default=0.0, help='0 is off')
  p.add_argument('--repetition_penalty', type=float, default=1.0, help='1 is off')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--num_samples', type=int, default=1, help='completions per prompt')
  p.add_argument('--stop', action='append', default=[], help='a stop string (repeatable)')
  p.add_argument('--ignore_eos', action='store_true', help='EOS does not end a completion')
  p.add_argument('--num_beams', type=int, default=0, help='beam search with this many beams (0: sample)')
  p.add_argument('--length_penalty', type=float, default=1.0, help='beam search: GNMT alpha')
  p.add_argument('--truncate', action='store_true', help='drop the oldest prompt tokens to fit the context')
  p.add_argument('--batch_size', type=int, default=32, help='prompts decoded together')
  p.add_argument('--jsonl', action='store_true', help='print JSON lines instead of text')
  p.add_argument('--output', default=None, help='write the JSON lines to this file')
  add_retrieve_arguments(p)
  distributed.add_arguments(p)


def sampling_params(args):
  from llm_jax.infer.sampling import SamplingParams
  params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, stop_strings=tuple(args.stop), ignore_eos=args.ignore_eos)
  params.check()
  return params


def beam_params(args):
  from llm_jax.infer.beam_search import BeamParams
  params = BeamParams(num_beams=args.num_beams, length_penalty=args.length_penalty,
                      max_new_tokens=args.max_new_tokens)
  params.check()
  if args.num_samples > args.num_beams:
    raise UserError(f'--num_samples={args.num_samples}: beam search returns at most --num_beams='
                    f'{args.num_beams} beams per prompt')
  if args.stop or args.temperature > 0:
    raise UserError('--num_beams: beam search takes neither --stop strings nor --temperature')
  return params


def read_prompts(args) -> list[str]:
  if args.prompt is not None and args.prompts_file is not None:
    raise UserError('give --prompt or --prompts_file, not both')
  if args.prompt is not None:
    if not args.prompt:
      raise UserError('--prompt is empty')
    return [args.prompt]
  source = args.prompts_file
  if source is None and sys.stdin.isatty():
    raise UserError('no prompt: give --prompt=TEXT, --prompts_file=FILE, or prompts on standard input')
  if source in (None, '-'):
    try:
      name, lines = 'standard input', sys.stdin.read().splitlines()
    except UnicodeDecodeError:
      raise UserError('standard input is not UTF-8 text') from None
  else:
    try:
      with open(source, encoding='utf-8') as f:
        name, lines = source, f.read().splitlines()
    except OSError as e:
      raise UserError(f'cannot read --prompts_file={source}: {e.strerror}') from None
    except UnicodeDecodeError:
      raise UserError(f'--prompts_file={source} is not UTF-8 text') from None
  prompts = [p for p in (_prompt_of(name, i, line, name.endswith('.jsonl')) for i, line in enumerate(lines, 1))
             if p is not None]
  if not prompts:
    raise UserError(f'{name} holds no prompts')
  return prompts


def _prompt_of(name: str, lineno: int, line: str, jsonl: bool) -> str | None:
  if not line.strip():
    return None
  if not jsonl and not line.lstrip().startswith('{'):
    return line
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{name}:{lineno}: not valid JSON ({e.msg})') from None
  if not isinstance(record, dict) or not isinstance(record.get('prompt'), str) or not record['prompt']:
    raise UserError(f'{name}:{lineno}: expected an object with a non-empty string "prompt"')
  return record['prompt']


def run(args, overrides) -> int:
  no_overrides('generate', overrides)
  nonempty('--workdir', args.workdir)
  check_output('--output', args.output)
  check_retrieve(args)
  if args.num_samples < 1:
    raise UserError(f'--num_samples={args.num_samples}: expected a positive integer')
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size}: expected a positive integer')
  default_new = args.max_new_tokens is None
  if default_new:
    args.max_new_tokens = DEFAULT_NEW_TOKENS
  params = beam_params(args) if args.num_beams else sampling_params(args)
  from llm_jax.infer import inference
  from llm_jax.models import family_of
  from llm_jax.run import workdir as workdir_lib
  cfg = workdir_lib.load_config(args.workdir)  # a missing run fails before prompts are read
  from llm_jax import models
  models.require_family(cfg, 'generate', 'generates')
  two_stacks = family_of(cfg.model).two_stacks
  if default_new and two_stacks:
    args.max_new_tokens = min(DEFAULT_NEW_TOKENS, cfg.data.target_len)
    params = dataclasses.replace(params, max_new_tokens=args.max_new_tokens)
  multi = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id) is not None
  if multi and args.prompt is None and args.prompts_file in (None, '-'):
    raise UserError('several processes cannot share standard input: give --prompt or --prompts_file=FILE')
  texts = read_prompts(args)
  distributed.initialize_from_args(args)
  import jax
  retrieved = None
  if args.retrieve:
    from llm_jax.retrieval import context
    retriever = context.Retriever(args.retrieve, args.retrieve_k)
  run_ = inference.load_run(args.workdir)
  shown = texts
  if args.retrieve:
    retrieved = context.augment(retriever, run_, texts, args.max_new_tokens)
    shown = [text for text, _ in retrieved]
  prompts = [inference.prompt_tokens(run_, t, args.max_new_tokens, args.truncate,
                                     name=f'prompt {i + 1}' if len(texts) > 1 else 'the prompt')
             for i, t in enumerate(shown)]
  records = _beam_records(run_, prompts, params, args) if args.num_beams else _sample_records(
      run_, shown, params, args)
  records = [{'index': r['index'], 'prompt': texts[r['index']], **r} for r in records]
  if retrieved is not None:  # the prompt as asked; the passages put before it
    records = [{**r, 'passages': retrieved[r['index']][1]} for r in records]
  if jax.process_index() != 0:  # every process decoded the same batches; one writes them
    return 0
  if args.output:
    write_jsonl(args.output, records)
  elif args.jsonl:
    for r in records:
      print(json.dumps(r, ensure_ascii=False))
  else:
    many = len(records) > 1
    for r in records:
      if many:
        print(f'--- prompt {r["index"] + 1}, sample {r["sample"] + 1} ({r["finish_reason"]})')
      # A decoder continues its prompt; an encoder-decoder's output stands alone (T5: the spans it filled).
      print(r['text'] if two_stacks else r['prompt'] + r['text'])
      if retrieved is not None:
        print(f'sources: {context.sources_line(r["passages"]) or "(none fitted the context)"}')
  return 0


def _sample_records(run_, texts, params, args):
  done = run_.generate(texts, params, num_samples=args.num_samples, truncate=args.truncate,
                       batch_size=args.batch_size)
  jobs = [(i, s) for i in range(len(texts)) for s in range(args.num_samples)]
  return [{'index': i, 'sample': s, 'text': c.text, 'tokens': c.tokens, 'finish_reason': c.finish_reason,
           'prompt_tokens': c.prompt_tokens} for (i, s), c in zip(jobs, done)]


def _beam_records(run_, prompts, params, args):
  records = []
  for start in range(0, len(prompts), args.batch_size):
    chunk = prompts[start:start + args.batch_size]
    for offset, beams in enumerate(run_.engine.beam_search(chunk, params)):
      i = start + offset
      for s, beam in enumerate(beams[:args.num_samples]):
        shown = beam.tokens[:-1] if beam.finish_reason == 'stop' else beam.tokens
        records.append({'index': i, 'sample': s, 'text': run_.text(shown), 'tokens': beam.tokens,
                        'finish_reason': beam.finish_reason, 'prompt_tokens': len(prompts[i]),
                        'score': beam.score, 'logprob': beam.logprob})
  return records
