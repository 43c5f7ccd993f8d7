"""`llm-jax serve`: the latest checkpoint behind OpenAI-compatible /v1/completions and /v1/chat/completions."""

import gc
import os
import sys

from llm_jax.commands.common import add_retrieve_arguments, check_retrieve, no_overrides, nonempty
from llm_jax.errors import UserError

HELP = 'serve the latest checkpoint over an OpenAI-compatible HTTP API'
API_KEY_ENV = 'LLM_JAX_API_KEY'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--host', default='127.0.0.1', help='0.0.0.0 listens on every interface')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--model_name', default=None, help="the model id clients see (default: the workdir's name)")
  p.add_argument('--api_key', default=None,
                 help=f'every request must carry "Authorization: Bearer KEY" (default: ${API_KEY_ENV}; '
                      'none: no key asked)')
  p.add_argument('--max_batch', type=int, default=32,
                 help='decode slots: requests decoded together at most (continuous batching: a new request '
                      'takes a free slot between steps)')
  p.add_argument('--batch_wait_ms', type=float, default=5.0,
                 help='how long an idle server waits after a first request for others to start with it')
  p.add_argument('--verbose', action='store_true', help='log every request on standard error')
  add_retrieve_arguments(p)


def run(args, overrides) -> int:
  no_overrides('serve', overrides)
  nonempty('--workdir', args.workdir)
  if not 0 <= args.port < 65536:
    raise UserError(f'--port={args.port}: expected 0 to 65535')
  if args.max_batch < 1:
    raise UserError(f'--max_batch={args.max_batch}: expected a positive integer')
  if args.batch_wait_ms < 0:
    raise UserError(f'--batch_wait_ms={args.batch_wait_ms}: expected a non-negative number')
  api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
  if args.api_key is not None and not args.api_key:
    raise UserError('--api_key is empty')
  check_retrieve(args)
  from llm_jax.infer import inference
  from llm_jax.serve import server, service
  from llm_jax.run import workdir as workdir_lib
  # The OpenAI-style API's context rules (prompt + new tokens in one window) and scoring are a decoder's.
  from llm_jax import models
  models.require_family(workdir_lib.load_config(args.workdir), 'serve', 'causal')
  sock_check = server.listen(args.host, args.port)  # a port in use fails before the model loads
  sock_check.close()
  retriever = None
  if args.retrieve:  # each prompt (or last user message) gets the index's nearest passages; responses list them
    from llm_jax.retrieval import context
    retriever = context.Retriever(args.retrieve, args.retrieve_k)
  run_ = inference.load_run(args.workdir)
  name = args.model_name or os.path.basename(os.path.abspath(args.workdir))
  app = service.App(run_, name, args.max_batch, args.batch_wait_ms / 1000, retriever, warm=True)
  # Everything loaded so far lives as long as the server: out of the collector's sight, a full collection
  # walks the objects requests make, not the 300,000 of JAX, Flax and the model (measured under load: each
  # full collection stopped the server for 180 ms, the slowest answers' whole tail; 5 to 15 ms frozen).
  gc.collect()
  gc.freeze()
  try:
    httpd = server.Server(server.make_app(app, api_key), args.host, args.port, args.verbose)
    if api_key is None and args.host not in server.LOOPBACK:
      print(f'llm-jax: warning: serving on --host={args.host} without an API key: anyone who can reach this '
            f'port can use the model (set --api_key or ${API_KEY_ENV})', file=sys.stderr, flush=True)
    print(f'serving {args.workdir} (step {run_.step}) as model {name!r} at {httpd.url}/v1', flush=True)
    httpd.run()  # returns after SIGTERM or Ctrl-C, once the requests in flight are answered
  finally:
    app.close()
  return 0
