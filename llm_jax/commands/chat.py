"""`llm-jax chat`: talk to a fine-tuned run in the terminal (or through a pipe).

Each line read from standard input is one user turn; an empty line or end of input ends the conversation.
The whole conversation is rendered with the run's chat template (data/chat.py: the checkpoint's own Jinja
template when its tokenizer_config.json has one, else the built-in one of a fine-tuned run) and the reply
decoded with the KV-cache Engine until the template's end marker, EOS or --max_new_tokens. The conversation is kept
between turns; when it no longer fits the context (data.seq_len) with room for the reply, the oldest turns
(after a --system message) are dropped, with a note on standard error.

Each turn is decoded from the full conversation: one prefill per turn. Keeping the cache between turns would
save that prefill, but the Engine's cache is sized per request and its compiled programs are reused across
turns, which matters more at the lengths a tiny CPU model chats at.

With `--retrieve=INDEX_DIR`, the passages nearest to each user turn are put into that turn (the template of
llm_jax/retrieval/context.py, trimmed to fit) and their sources said on standard error; later turns see the
plain message, so old passages do not crowd the context.
"""

from __future__ import annotations

import sys

from llm_jax import distributed
from llm_jax.commands.common import add_retrieve_arguments, check_retrieve, no_overrides
from llm_jax.errors import UserError

HELP = 'chat with a fine-tuned run (one line per turn; an empty line ends)'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--system', default='', help='a system message first in the conversation (if the template '
                 'has a role for it: the first of data.chat_roles when there are three or more)')
  p.add_argument('--max_new_tokens', type=int, default=None,
                 help='longest reply; default 128, at most half the context (data.seq_len)')
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top_p', type=float, default=1.0, help='1 is off')
  p.add_argument('--seed', type=int, default=0)
  add_retrieve_arguments(p)
  distributed.add_arguments(p)


def fit(template, system: list, turns: list, room: int) -> tuple[list[int], int]:
  """The prompt ids of `system` + `turns` (pairs of messages, the last one the user's alone), dropping the
  oldest turns until it fits `room` tokens; (ids, turns dropped). The newest turn is never dropped."""
  dropped = 0
  while True:
    ids = template.prompt(system + [m for turn in turns for m in turn])
    if len(ids) <= room or len(turns) == 1:
      return ids, dropped
    turns.pop(0)
    dropped += 1


def run(args, overrides) -> int:
  no_overrides('chat', overrides)
  check_retrieve(args)
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={args.max_new_tokens}: expected a positive integer')
  from llm_jax.data import chat, objectives
  from llm_jax.infer import inference
  from llm_jax.run import workdir as workdir_lib
  from llm_jax.infer.sampling import SamplingParams
  cfg = workdir_lib.load_config(args.workdir)  # a missing run fails before anything is read
  from llm_jax import models
  models.require_family(cfg, 'chat', 'causal', why='chat needs a decoder-only model fine-tuned with a '
                        'chat template (the sft recipe)')
  has_own = bool(workdir_lib.load_tokenizer(args.workdir, cfg).chat_template)
  if not objectives.of(cfg.data).chat and not has_own:
    raise UserError(f'chat: this run was trained with data.objective={cfg.data.objective!r} and has no chat '
                    'template; fine-tune it first (--config=sft with --config.init_from)')
  roles = cfg.data.chat_roles
  if args.max_new_tokens is None:
    args.max_new_tokens = min(128, cfg.data.seq_len // 2)
  if args.system and len(roles) < 3:
    raise UserError(f'--system: the template has no system role (data.chat_roles={tuple(roles)})')
  params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          max_new_tokens=args.max_new_tokens)
  params.check()
  room = cfg.data.seq_len - args.max_new_tokens
  if room < 4:
    raise UserError(f'--max_new_tokens={args.max_new_tokens} leaves no room for a conversation in the context '
                    f'of {cfg.data.seq_len} tokens (data.seq_len of the run)')
  distributed.initialize_from_args(args)
  retriever = None
  if args.retrieve:
    from llm_jax.retrieval import context
    retriever = context.Retriever(args.retrieve, args.retrieve_k)
  run_ = inference.load_run(args.workdir)
  template = run_.chat_template
  user, reply_role = roles[-2], roles[-1]
  system = [(roles[0], args.system)] if args.system else []
  turns: list[list[tuple[str, str]]] = []
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print('> ', end='', flush=True)
    line = sys.stdin.readline()
    if not line or not line.strip():
      return 0
    turns.append([(user, line.rstrip('\n'))])
    try:
      if retriever is not None:  # passages for this turn alone: the conversation keeps the plain message
        turns[-1], used = context.augment_messages(retriever, turns[-1], user,
                                                   lambda m: len(template.prompt(system + m)), room)
        print(f'llm-jax: sources: {context.sources_line(used) or "(none fitted the context)"}', file=sys.stderr,
              flush=True)
      ids, dropped = fit(template, system, turns, room)
    except chat.TemplateError as e:  # the checkpoint's template refused the conversation
      print(f'llm-jax: note: {e}', file=sys.stderr, flush=True)
      turns.pop()
      continue
    if dropped:
      print(f'llm-jax: note: the conversation outgrew the context of {cfg.data.seq_len} tokens; dropped the '
            f'oldest {dropped} turn(s)', file=sys.stderr, flush=True)
    if len(ids) > room:
      print(f'llm-jax: note: that message is {len(ids)} tokens with the template; the context leaves room '
            f'for {room} (data.seq_len={cfg.data.seq_len} less --max_new_tokens): say it shorter',
            file=sys.stderr, flush=True)
      turns.pop()
      continue
    text = run_.chat(system + [m for turn in turns for m in turn], params)  # the ids fit() measured
    print(text, flush=True)
    turns[-1] = [(user, line.rstrip('\n')), (reply_role, text)]
