"""The HTTP side of `llm-jax serve`: a FastAPI app served by uvicorn (what vLLM, JetStream and levanter serve
with), in front of service.App, which does the work.

Routes: GET /v1/models, /health; POST /v1/completions, /v1/chat/completions; and the tokenizer endpoints
evaluation harnesses probe (GET /tokenizer_info, POST /tokenize, /detokenize). Bodies are parsed by
openai_api (not by pydantic models) so a bad field is a 400 whose message names it, in OpenAI's error shape;
a body over `max_body_bytes` is a 413 before it is read whole. With an API key, every route but /health needs
`Authorization: Bearer KEY` (401 otherwise; compared in constant time). uvicorn's listen backlog (2048) keeps
a few hundred clients connecting at once from being reset, and its SIGTERM handling stops accepting, lets the
requests in flight finish, then returns.
"""

import hmac
import json
import signal
import socket
import sys
import threading
import traceback

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llm_jax.errors import UserError
from llm_jax.serve.openai_api import ApiError

BACKLOG = 2048
MAX_BODY_BYTES = 4 << 20  # far above any prompt that fits a context; a bigger body is a mistake or an attack
LOOPBACK = ('127.0.0.1', 'localhost', '::1')


def error_body(status: int, message: str) -> dict:
  kind = {401: 'authentication_error', 404: 'not_found_error'}.get(
      status, 'invalid_request_error' if status < 500 else 'server_error')
  return {'error': {'message': message, 'type': kind, 'code': status}}


class _Guard:
  """The API key and the body's announced size, checked before anything reads the body. A plain ASGI
  middleware: Starlette's @app.middleware('http') runs every request through a task group and two memory
  streams, which cost more host time than the rest of a /tokenize request's handling."""

  def __init__(self, app, expected: bytes | None, max_body_bytes: int):
    self.app, self.expected, self.max_body_bytes = app, expected, max_body_bytes

  async def __call__(self, scope, receive, send):
    if scope['type'] == 'http':
      problem = self._problem(scope)
      if problem is not None:
        status, message = problem
        await JSONResponse(error_body(status, message), status_code=status)(scope, receive, send)
        return
    await self.app(scope, receive, send)

  def _problem(self, scope) -> tuple[int, str] | None:
    headers = dict(scope['headers'])  # lower-case byte names, as ASGI gives them
    if self.expected is not None and scope['path'].rstrip('/') != '/health':
      if not hmac.compare_digest(headers.get(b'authorization', b''), self.expected):
        return 401, 'missing or wrong API key: send "Authorization: Bearer KEY"'
    length = headers.get(b'content-length', b'')
    if length.isdigit() and int(length) > self.max_body_bytes:
      return 413, f'the request body is {int(length)} bytes; this server takes at most {self.max_body_bytes}'
    return None


def make_app(app, api_key=None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
  """The FastAPI application answering for `app` (service.App)."""
  api = FastAPI(title='llm-jax', docs_url=None, redoc_url=None, openapi_url=None)
  expected = f'Bearer {api_key}'.encode() if api_key else None

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)

  @api.exception_handler(HTTPException)
  async def _http_error(request, exc):  # unknown paths and methods, in the same error shape
    message = f'no such path: {request.url.path}' if exc.status_code == 404 else str(exc.detail)
    return error(exc.status_code, message)

  @api.exception_handler(ApiError)
  async def _api_error(request, exc):  # a bad body found before the route answers (tokenize, detokenize)
    return error(exc.status, str(exc))

  api.add_middleware(_Guard, expected=expected, max_body_bytes=max_body_bytes)

  async def body_of(request: Request):
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no Content-Length: count as it arrives
      raw += chunk
      if len(raw) > max_body_bytes:
        raise ApiError(413, f'the request body is over {max_body_bytes} bytes, the most this server takes')
    try:
      return json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ApiError(400, f'the request body is not valid JSON: {e}') from None

  async def answer(request: Request, chat: bool):
    try:
      body = await body_of(request)
      return await app.respond(body, chat, disconnected=request.is_disconnected)
    except ApiError as e:
      return error(e.status, str(e))
    except Exception as e:  # noqa: BLE001 - a bug or a device failure: this request fails, the server lives
      traceback.print_exc(file=sys.stderr)
      return error(500, f'{type(e).__name__}: {e}')

  def respond(result):
    if isinstance(result, JSONResponse):
      return result
    if isinstance(result, dict):
      return JSONResponse(result)
    return StreamingResponse(result, media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})

  @api.post('/v1/completions')
  async def completions(request: Request):
    return respond(await answer(request, chat=False))

  @api.post('/v1/chat/completions')
  async def chat_completions(request: Request):
    return respond(await answer(request, chat=True))

  @api.get('/v1/models')
  async def models():
    return app.models()

  @api.get('/health')
  async def health():
    return {'status': 'ok'}

  @api.get('/tokenizer_info')
  async def tokenizer_info():
    return app.tokenizer.tokenizer_info()

  @api.post('/tokenize')
  async def tokenize(request: Request):
    return app.tokenizer.tokenize(await body_of(request))

  @api.post('/detokenize')
  async def detokenize(request: Request):
    return app.tokenizer.detokenize(await body_of(request))

  return api


def listen(host: str, port: int) -> socket.socket:
  """A listening socket, bound before anything is printed, so `--port=0` can report the port it got."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise UserError(f'--host={host}: cannot resolve it ({e.strerror})') from None
  family, _, _, _, address = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise UserError(f'cannot listen on {host}:{port}: {e.strerror}') from None
  sock.listen(BACKLOG)
  sock.set_inheritable(True)
  return sock


class Server:
  """uvicorn serving a FastAPI app on a bound socket: `run()` in the main thread (SIGTERM and Ctrl-C stop it
  gracefully), or `start()` / `stop()` on a thread (tests, benchmarks)."""

  def __init__(self, api, host: str = '127.0.0.1', port: int = 0, verbose: bool = False,
               graceful_timeout_s=None):
    import uvicorn
    self.sock = listen(host, port)
    self.host, self.port = self.sock.getsockname()[:2]
    config = uvicorn.Config(api, log_level='info' if verbose else 'warning', access_log=verbose,
                            backlog=BACKLOG, timeout_graceful_shutdown=graceful_timeout_s,
                            timeout_keep_alive=30, lifespan='off')
    self.uvicorn = uvicorn.Server(config)
    self._thread = None

  @property
  def url(self) -> str:
    host = f'[{self.host}]' if ':' in self.host else self.host
    return f'http://{host}:{self.port}'

  def run(self) -> None:
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the SIGTERM it shut down on once it is done; a stop asked for and carried out is a
    # clean exit (status 0, and the caller's cleanup runs), so that second delivery is ignored.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
      self.uvicorn.run(sockets=[self.sock])
    finally:
      self.sock.close()
      if main:
        signal.signal(signal.SIGTERM, previous)

  def start(self) -> 'Server':
    self._thread = threading.Thread(target=self.run, name='llm-jax-http', daemon=True)
    self._thread.start()
    while not self.uvicorn.started and self._thread.is_alive():
      threading.Event().wait(0.01)
    return self

  def stop(self) -> None:
    self.uvicorn.should_exit = True
    if self._thread is not None:
      self._thread.join()

