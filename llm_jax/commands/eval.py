"""`llm-jax eval`: held-out loss, perplexity and bits per byte of a run's latest checkpoint."""

from llm_jax.commands.common import no_overrides, write_json

HELP = 'held-out loss, perplexity and bits per byte of the latest checkpoint'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', default=None, help='also write the results as JSON to this file')


def run(args, overrides) -> int:
  no_overrides('eval', overrides)
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
    write_json(args.output, result)
  return 0
