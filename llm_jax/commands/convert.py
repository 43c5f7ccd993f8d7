"""`llm-jax convert`: Hugging Face checkpoints in and out.

    llm-jax convert from-hf HF_DIR --output=WORKDIR [--config.KEY=VALUE ...]
    llm-jax convert to-hf --workdir=WORKDIR --output=HF_DIR

from-hf reads a transformers directory (config.json and safetensors weights) of LLaMA, GPT-2, BERT or T5
into a new work directory that `eval`, `generate` and `train` use like any run; overrides change the
imported config (say --config.data.seq_len=4096 or --config.mesh.tensor=4). to-hf writes a run's latest
params as a directory `transformers` loads with `from_pretrained`. Neither overwrites a non-empty output
directory, and a failure leaves none behind.
"""

HELP = 'convert checkpoints from and to Hugging Face transformers (safetensors)'


def add_arguments(p) -> None:
  sub = p.add_subparsers(dest='direction', required=True, parser_class=type(p))
  a = sub.add_parser('from-hf', help='a transformers directory -> a new llm-jax work directory')
  a.add_argument('hf_dir', help='directory with config.json and model.safetensors (or a sharded index)')
  a.add_argument('--output', required=True, help='the work directory to create')
  b = sub.add_parser('to-hf', help="a run's latest params -> a new transformers directory")
  b.add_argument('--workdir', required=True)
  b.add_argument('--output', required=True, help='the Hugging Face directory to create')


def run(args, overrides) -> int:
  from llm_jax import convert
  from llm_jax.commands.common import nonempty
  nonempty('--output', args.output)  # empty would mean the current directory
  convert.check_output(args.output)  # before reading gigabytes of weights
  if args.direction == 'from-hf':
    summary = convert.from_hf(args.hf_dir, args.output, overrides)
    print(f'{summary["architecture"]} ({summary["params"]:,} parameters) {summary["tokenizer"]} -> {args.output}')
    return 0
  from llm_jax.commands.common import no_overrides
  no_overrides('convert to-hf', overrides)
  summary = convert.to_hf(args.workdir, args.output)
  print(f'step {summary["step"]} of {args.workdir} -> {summary["architecture"]} in {args.output} '
        f'({summary["tensors"]} tensors)')
  return 0
