"""`llm-jax serve`: a run behind an OpenAI-compatible HTTP API (standard library only).

Each HTTP request is handled on its own thread, which turns it into jobs (one per prompt and sample, plus a
scoring job when `echo` or `logprobs` ask for log-probabilities) and waits. One worker thread owns the
device: it takes the jobs that arrived within `batch_wait_s` of each other (up to `max_batch`) and runs them
as one batch, so concurrent requests are decoded together. A request that is not valid JSON or has a bad
field gets a 400 naming the problem; a failure inside a batch fails only the requests in it (500); the
server keeps serving either way.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llm_jax.infer import inference, loglik
from llm_jax.serve import openai_api
from llm_jax.errors import UserError
from llm_jax.serve.openai_api import ApiError


@dataclass
class _Job:
  kind: str  # 'generate' | 'score'
  tokens: list[int]
  sampling: object = None
  sample: int = 0
  future: Future = None


class Batcher:
  """Collects jobs from request threads and runs them in batches on one worker thread."""

  def __init__(self, run: inference.Run, max_batch: int, batch_wait_s: float):
    self.run, self.max_batch, self.wait = run, max_batch, batch_wait_s
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._work, name='llm-jax-batcher', daemon=True)
    self._thread.start()

  def submit(self, kind: str, tokens, sampling=None, sample: int = 0) -> Future:
    job = _Job(kind, list(tokens), sampling, sample, Future())
    self._queue.put(job)
    return job.future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()

  def _work(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      jobs = [first]
      deadline = time.monotonic() + self.wait
      while len(jobs) < self.max_batch:
        try:
          job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if job is None:
          self._queue.put(None)  # finish this batch, then stop
          break
        jobs.append(job)
      for kind, run_batch in (('generate', self._generate), ('score', self._score)):
        group = [j for j in jobs if j.kind == kind]
        if not group:
          continue
        try:
          for job, out in zip(group, run_batch(group)):
            job.future.set_result(out)
        except Exception as e:  # noqa: BLE001 - reported to each waiting request as a 500
          traceback.print_exc(file=sys.stderr)
          for job in group:
            if not job.future.done():
              job.future.set_exception(e)

  def _generate(self, group):
    return inference.complete(self.run, [j.tokens for j in group], [j.sampling for j in group],
                              [j.sample for j in group])

  def _score(self, group):
    return loglik.score(self.run.engine, [j.tokens for j in group], batch_size=self.max_batch)


class App:
  """Turns parsed requests into jobs and jobs' results into OpenAI responses."""

  def __init__(self, run: inference.Run, model_name: str, max_batch: int = 32, batch_wait_s: float = 0.005,
               retriever=None):
    self.run, self.model_name = run, model_name
    self.retriever = retriever  # retrieval/context.Retriever: passages go into prompts (serve --retrieve)
    self.batcher = Batcher(run, max_batch, batch_wait_s)
    # The checkpoint's own chat template, or a fine-tuned run's built-in one, renders /v1/chat/completions.
    from llm_jax.data import chat
    self.template = chat.template_for(run.cfg.data, run.tokenizer)

  def models(self) -> dict:
    return {'object': 'list', 'data': [{'id': self.model_name, 'object': 'model', 'created': 0,
                                        'owned_by': 'llm-jax'}]}

  def _tokens(self, prompt, max_new: int | None) -> list[int]:
    run = self.run
    context = run.context_len
    if isinstance(prompt, list):
      vocab = run.cfg.model.vocab_size
      if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f'"prompt" holds a token id outside [0, {vocab})')
      if len(prompt) + (max_new or 0) > context:
        raise ApiError(400, f'the prompt of {len(prompt)} tokens plus "max_tokens"={max_new or 0} exceeds the '
                            f'context of {context} tokens')
      return prompt
    try:
      return inference.prompt_tokens(run, prompt, max_new or 1, name='the prompt', flag='"max_tokens"')
    except UserError as e:
      raise ApiError(400, str(e)) from None

  def complete(self, body, chat: bool) -> tuple[openai_api.Parsed, dict]:
    """The parsed request and its answer; an ApiError (400) for a bad request."""
    parsed = openai_api.parse(body, chat, self.template)
    passages = None
    if self.retriever is not None:
      from llm_jax.retrieval import context
      body, passages = context.augment_request(self.retriever, self.run, body, chat, parsed.max_tokens,
                                               self.template)
      parsed = openai_api.parse(body, chat, self.template)
    tok = self.run.tokenizer
    prompts = []
    for p in parsed.prompts:
      ids = self._tokens(p, parsed.max_tokens)
      max_new = parsed.max_tokens if parsed.max_tokens is not None else self.run.context_len - len(ids)
      if max_new < 0 or (parsed.max_tokens is None and max_new < 1):
        raise ApiError(400, f'the prompt of {len(ids)} tokens leaves no room in the context of '
                            f'{self.run.context_len} tokens')
      prompts.append((p, ids, max_new))
    jobs = []  # (prompt index, sample, future of the completion or None)
    for i, (_, ids, max_new) in enumerate(prompts):
      for j in range(parsed.n):
        sampling = replace(parsed.sampling, max_new_tokens=max_new) if max_new else None
        jobs.append((i, j, self.batcher.submit('generate', ids, sampling, j) if max_new else None))
    want_logprobs = parsed.logprobs is not None
    choices, completion_tokens = [], 0
    for index, (i, j, future) in enumerate(jobs):
      text_prompt, ids, _ = prompts[i]
      done = future.result() if future is not None else None
      new = done.tokens if done is not None else []
      completion_tokens += len(new)
      text = done.text if done is not None else ''
      if parsed.echo:
        text = (text_prompt if isinstance(text_prompt, str) else tok.decode(ids)) + text
      logprobs = None
      if want_logprobs and len(ids) + len(new) >= 2:
        s = self.batcher.submit('score', ids + new).result()
        first = 0 if parsed.echo else len(ids)
        lps = [None] + s.logprobs
        tops = [None] + s.top_logprobs
        top_tokens = [None] + s.top_tokens
        shown_prompt = text_prompt if isinstance(text_prompt, str) else tok.decode(ids)
        logprobs = openai_api.logprobs_object(tok, (ids + new)[first:], lps[first:], top_tokens[first:],
                                              tops[first:], offset=0 if parsed.echo else len(shown_prompt))
      reason = done.finish_reason if done is not None else 'length'
      choices.append(openai_api.choice(parsed, index, text, reason, logprobs))
      if passages is not None:  # the passages put into the prompt this choice answers
        choices[-1]['passages'] = passages[i]
    prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
    return parsed, openai_api.response(parsed, self.model_name, choices, prompt_tokens, completion_tokens)

  def close(self) -> None:
    self.batcher.close()


class Handler(BaseHTTPRequestHandler):
  server_version = 'llm-jax'
  protocol_version = 'HTTP/1.1'

  def log_message(self, fmt, *args):  # one line per request, on stderr
    if self.server.verbose:
      super().log_message(fmt, *args)

  def _send(self, status: int, obj) -> None:
    data = json.dumps(obj).encode('utf-8')
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str) -> None:
    self._send(status, {'error': {'message': message, 'type': 'invalid_request_error' if status < 500
                                  else 'server_error', 'code': status}})

  def do_GET(self):
    path = self.path.split('?')[0].rstrip('/')
    if path == '/v1/models':
      self._send(200, self.server.app.models())
    elif path in ('/health', ''):
      self._send(200, {'status': 'ok'})
    else:
      self._error(404, f'no such path: {self.path}')

  def do_POST(self):
    path = self.path.split('?')[0].rstrip('/')
    routes = {'/v1/completions': False, '/v1/chat/completions': True}
    length = int(self.headers.get('Content-Length') or 0)
    raw = self.rfile.read(length) if length else b''
    if path not in routes:
      self._error(404, f'no such path: {self.path}')
      return
    try:
      try:
        body = json.loads(raw.decode('utf-8'))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f'the request body is not valid JSON: {e}') from None
      parsed, answer = self.server.app.complete(body, chat=routes[path])
    except ApiError as e:
      self._error(e.status, str(e))
      return
    except Exception as e:  # noqa: BLE001 - a bug or a device failure: this request fails, the server lives
      traceback.print_exc(file=sys.stderr)
      self._error(500, f'{type(e).__name__}: {e}')
      return
    if parsed.stream:
      self._stream(openai_api.stream_chunks(parsed, answer))
    else:
      self._send(200, answer)

  def _stream(self, chunks) -> None:
    self.send_response(200)
    self.send_header('Content-Type', 'text/event-stream')
    self.send_header('Cache-Control', 'no-cache')
    self.send_header('Connection', 'close')
    self.end_headers()
    for chunk in chunks:
      self.wfile.write(f'data: {json.dumps(chunk)}\n\n'.encode('utf-8'))
    self.wfile.write(b'data: [DONE]\n\n')
    self.wfile.flush()
    self.close_connection = True


def make_server(app: App, host: str, port: int, verbose: bool = False) -> ThreadingHTTPServer:
  try:
    server = ThreadingHTTPServer((host, port), Handler)
  except OSError as e:
    raise UserError(f'cannot listen on {host}:{port}: {e.strerror}') from None
  server.daemon_threads = True
  server.app, server.verbose = app, verbose
  return server
