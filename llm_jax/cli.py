"""The `llm-jax` command: train, eval, generate.

Config flags follow the JAX convention: `--config=configs/tiny.py[:variant]` picks a recipe and
`--config.section.key=value` overrides one key. A user mistake ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from llm_jax.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag as a UserError (one line) instead of usage text plus exit."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def _split_config_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` (or `--config.a.b v`) pairs from the flags argparse did not know."""
  overrides, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith('--config.'):
      raise UserError(f'unknown flag {arg}')
    key, eq, value = arg[len('--config.'):].partition('=')
    if not eq:
      if i + 1 >= len(extra):
        raise UserError(f'flag --config.{key} needs a value')
      value = extra[i + 1]
      i += 1
    if not key:
      raise UserError(f'flag {arg} names no config key')
    overrides.append((key, value))
    i += 1
  return overrides


def _cmd_train(args, overrides) -> int:
  from llm_jax import workdir as workdir_lib
  from llm_jax.train import loop
  cfg = workdir_lib.resolve_train_config(args.workdir, args.config, overrides)
  loop.train(cfg, args.workdir)
  return 0


def _cmd_eval(args, overrides) -> int:
  if overrides:
    raise UserError('eval reads the run\'s own config; --config.* overrides are not accepted')
  from llm_jax import evaluate
  result = evaluate.evaluate_workdir(args.workdir)
  base = result['baselines_bits_per_byte']
  print(f'step {result["step"]}: {result["documents"]} held-out documents, {result["bytes"]:,} bytes, '
        f'{result["tokens"]:,} tokens')
  print(f'loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  '
        f'token accuracy {result["token_accuracy"]:.3f}')
  print('bits per byte: llm-jax {:.3f}   '.format(result['bits_per_byte'])
        + '   '.join(f'{name} {bpb:.3f}' for name, bpb in base.items()))
  if args.output:
    _write_json(args.output, result)
  return 0


def _write_json(path: str, obj) -> None:
  import os
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror}') from None


def _cmd_generate(args, overrides) -> int:
  if overrides:
    raise UserError('generate reads the run\'s own config; --config.* overrides are not accepted')
  if args.temperature < 0:
    raise UserError(f'--temperature={args.temperature}: expected a value >= 0 (0 is greedy)')
  if not 0 < args.top_p <= 1:
    raise UserError(f'--top_p={args.top_p}: expected a value in (0, 1]')
  if args.top_k < 0:
    raise UserError(f'--top_k={args.top_k}: expected a value >= 0 (0 is off)')
  if args.max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={args.max_new_tokens}: expected a positive integer')
  if not args.prompt:
    raise UserError('--prompt is empty')
  from llm_jax import inference
  text = inference.generate_text(args.workdir, args.prompt, args.max_new_tokens, args.temperature,
                                  args.top_k, args.top_p, args.seed)
  print(args.prompt + text)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='llm-jax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)

  p = sub.add_parser('train', help='train (or resume) a run in --workdir')
  p.add_argument('--workdir', required=True)
  p.add_argument('--config', default=None,
                 help='recipe file[:variant]; default configs/tiny.py, or the workdir\'s saved config')
  p.set_defaults(fn=_cmd_train)

  p = sub.add_parser('eval', help='held-out loss, perplexity and bits per byte of the latest checkpoint')
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', default=None, help='also write the results as JSON to this file')
  p.set_defaults(fn=_cmd_eval)

  p = sub.add_parser('generate', help='continue a prompt with the latest checkpoint')
  p.add_argument('--workdir', required=True)
  p.add_argument('--prompt', default='def fibonacci(n):')
  p.add_argument('--max_new_tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top_k', type=int, default=0)
  p.add_argument('--top_p', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.set_defaults(fn=_cmd_generate)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args, extra = build_parser().parse_known_args(argv)
    overrides = _split_config_overrides(extra)
    return args.fn(args, overrides)
  except UserError as e:
    print(f'llm-jax: error: {e}', file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print('llm-jax: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
