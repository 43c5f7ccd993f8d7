"""`llm-jax serve`: the latest checkpoint behind OpenAI-compatible /v1/completions and /v1/chat/completions."""

import os

from llm_jax.commands.common import add_retrieve_arguments, check_retrieve, no_overrides, nonempty
from llm_jax.errors import UserError

HELP = 'serve the latest checkpoint over an OpenAI-compatible HTTP API'


def add_arguments(p) -> None:
  p.add_argument('--workdir', required=True)
  p.add_argument('--host', default='127.0.0.1', help='0.0.0.0 listens on every interface')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--model_name', default=None, help="the model id clients see (default: the workdir's name)")
  p.add_argument('--max_batch', type=int, default=32, help='requests decoded together at most')
  p.add_argument('--batch_wait_ms', type=float, default=5.0,
                 help='how long the first request of a batch waits for others to join it')
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
  check_retrieve(args)
  from llm_jax.infer import inference
  from llm_jax.serve import server
  from llm_jax.run import workdir as workdir_lib
  # The OpenAI-style API's context rules (prompt + new tokens in one window) and scoring are a decoder's.
  inference.require_family(workdir_lib.load_config(args.workdir), 'serve', ('decoder',))
  retriever = None
  if args.retrieve:  # each prompt (or last user message) gets the index's nearest passages; responses list them
    from llm_jax.retrieval import context
    retriever = context.Retriever(args.retrieve, args.retrieve_k)
  run_ = inference.load_run(args.workdir)
  name = args.model_name or os.path.basename(os.path.abspath(args.workdir))
  app = server.App(run_, name, args.max_batch, args.batch_wait_ms / 1000, retriever)
  httpd = server.make_server(app, args.host, args.port, args.verbose)
  host, port = httpd.server_address[:2]
  print(f'serving {args.workdir} (step {run_.step}) as model {name!r} at http://{host}:{port}/v1', flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
    app.close()
  return 0
