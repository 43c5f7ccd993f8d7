"""`llm-jax generate`: continue a prompt with a run's latest checkpoint and the KV cache."""

from llm_jax.commands.common import no_overrides
from llm_jax.errors import UserError

HELP = 'continue a prompt with the latest checkpoint'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--prompt', default='def fibonacci(n):')
  p.add_argument('--max_new_tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top_k', type=int, default=0, help='0 is off')
  p.add_argument('--top_p', type=float, default=1.0, help='1 is off')
  p.add_argument('--seed', type=int, default=0)


def check_sampling_flags(args) -> None:
  if args.temperature < 0:
    raise UserError(f'--temperature={args.temperature}: expected a value >= 0 (0 is greedy)')
  if not 0 < args.top_p <= 1:
    raise UserError(f'--top_p={args.top_p}: expected a value in (0, 1]')
  if args.top_k < 0:
    raise UserError(f'--top_k={args.top_k}: expected a value >= 0 (0 is off)')
  if args.max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={args.max_new_tokens}: expected a positive integer')


def run(args, overrides) -> int:
  no_overrides('generate', overrides)
  check_sampling_flags(args)
  if not args.prompt:
    raise UserError('--prompt is empty')
  from llm_jax import inference
  text = inference.generate_text(args.workdir, args.prompt, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.seed)
  print(args.prompt + text)
  return 0
