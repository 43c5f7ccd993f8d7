"""`llm-jax eval`: loss, perplexity, token accuracy and bits per byte of a run's latest checkpoint on its
held-out text or any other source (`--data`), and multiple-choice tasks (`--task`)."""

import os

from llm_jax import distributed
from llm_jax.commands.common import check_output, no_overrides, nonempty, write_json
from llm_jax.errors import UserError

HELP = 'held-out loss, perplexity, bits per byte and multiple-choice tasks of the latest checkpoint'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--data', default=None,
                 help="score every document of this source ('builtin' or a glob of .txt/.jsonl) instead of "
                      "the run's held-out split")
  p.add_argument('--task', action='append', default=[],
                 help='a multiple-choice JSONL file ({"context", "choices", "gold"}); repeatable. '
                      'Only tasks are run unless --data is given too')
  p.add_argument('--max_tokens', type=int, default=None,
                 help='score whole documents up to this many tokens (default: eval.max_tokens of the run)')
  p.add_argument('--batch_size', type=int, default=32, help='task sequences scored together')
  p.add_argument('--output', default=None, help='also write the results as JSON to this file')
  distributed.add_arguments(p)


def run(args, overrides) -> int:
  no_overrides('eval', overrides)
  nonempty('--workdir', args.workdir)
  check_output('--output', args.output)
  if args.max_tokens is not None and args.max_tokens < 1:
    raise UserError(f'--max_tokens={args.max_tokens}: expected a positive integer')
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size}: expected a positive integer')
  if args.data is not None and not args.data:
    raise UserError('--data is empty')
  from llm_jax.evaluate import heldout, tasks
  from llm_jax.infer import inference
  from llm_jax.run import workdir as workdir_lib
  if args.task:  # choices are ranked by their log-likelihood as a continuation: a decoder's
    from llm_jax import models
    models.require_family(workdir_lib.load_config(args.workdir), 'eval --task', 'causal',
                          'multiple-choice tasks score continuations with a decoder-only model')
  task_items = {path: tasks.read(path) for path in args.task}  # bad task files fail before the model loads
  distributed.initialize_from_args(args)
  import jax
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)  # every process scores, one reports
  run_ = inference.load_run(args.workdir)
  result = {'step': run_.step}
  if args.data is not None or not args.task:
    result.update(heldout.evaluate_run(run_, args.data, args.max_tokens, progress=True))
    _print_data(result, say)
  if task_items:
    result['tasks'] = {}
    for path, items in task_items.items():
      bar = heldout.progress_bar(sum(len(i.choices) for i in items), 'choices')
      try:
        scores = tasks.evaluate(run_, items, args.batch_size, progress=bar.update)
      finally:
        bar.close()
      name = os.path.splitext(os.path.basename(path))[0]
      result['tasks'][name] = {'file': path, **scores}
      say(f'task {name}: {scores["items"]} items  accuracy {scores["accuracy"]:.3f}  '
          f'accuracy_norm {scores["accuracy_norm"]:.3f}')
      if scores['choices_first_token_unscored']:
        say(f'task {name}: the first token of {scores["choices_first_token_unscored"]} choices could not be '
            'scored (an empty context and no BOS: data.add_bos=false); their scores sum the tokens after it')
  if args.output and jax.process_index() == 0:
    write_json(args.output, result)
  return 0


def _print_data(result, say=print) -> None:
  say(f'step {result["step"]}: {result["data"]}: {result["documents"]} documents, {result["bytes"]:,} bytes, '
      f'{result["tokens"]:,} tokens')
  if 'masked_token_loss' in result:
    say(f'masked-token loss {result["masked_token_loss"]:.4f}  masked-token accuracy '
        f'{result["masked_token_accuracy"]:.3f}  ({result["masked_tokens"]:,} masked tokens)')
    return
  if 'target_tokens' in result:
    say(f'target loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  target token accuracy '
        f'{result["token_accuracy"]:.3f}  ({result["target_tokens"]:,} target tokens)')
    return
  base = result['baselines_bits_per_byte']
  say(f'loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  '
      f'token accuracy {result["token_accuracy"]:.3f}')
  say('bits per byte: llm-jax {:.3f}   '.format(result['bits_per_byte'])
      + '   '.join(f'{name} {bpb:.3f}' for name, bpb in base.items()))
