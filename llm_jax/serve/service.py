"""What `llm-jax serve` does with a request, apart from HTTP (server.py): the OpenAI body turned into engine
work and the results into the OpenAI answer.

Each request becomes jobs (one per prompt and sample, plus a scoring job when `echo` or `logprobs` ask for log-probabilities) and waits. One worker thread owns the
device: it takes the jobs that arrived within `batch_wait_s` of each other (up to `max_batch`) and runs them
as one batch, so concurrent requests are decoded together. A request that is not valid JSON or has a bad
field gets a 400 naming the problem (ApiError); a failure inside a batch fails only the requests in it (500);
the server keeps serving either way.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, replace

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
    return self.run.complete([j.tokens for j in group], [j.sampling for j in group], [j.sample for j in group])

  def _score(self, group):
    return loglik.score(self.run.engine, [j.tokens for j in group], batch_size=self.max_batch)


class App:
  """Turns parsed requests into jobs and jobs' results into OpenAI responses."""

  def __init__(self, run: inference.Run, model_name: str, max_batch: int = 32, batch_wait_s: float = 0.005):
    self.run, self.model_name = run, model_name
    self.batcher = Batcher(run, max_batch, batch_wait_s)
    self.template = run.chat_template  # a fine-tuned run's renders /v1/chat/completions
    self._limiter = None  # threads waiting on the batcher: one per request in flight (made in the loop)
    tok = run.tokenizer
    self._special_ids = {tok.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id)
                         if 0 <= i < tok.vocab_size}
    self._special_split = re.compile('(' + '|'.join(map(re.escape, self._special_ids)) + ')') \
        if self._special_ids else None

  def models(self) -> dict:
    return {'object': 'list', 'data': [{'id': self.model_name, 'object': 'model', 'created': 0,
                                        'owned_by': 'llm-jax'}]}

  def _tokens(self, prompt, max_new: int | None) -> tuple[list[int], int]:
    """(the ids the model reads, how many of them the client did not send). Token-id prompts of a run trained
    with BOS first get it in front unless they start with it: the model only ever saw text after BOS, and
    text prompts get it too (harnesses such as lm-evaluation-harness send contexts without it)."""
    run = self.run
    context = run.context_len
    if isinstance(prompt, list):
      vocab = run.cfg.model.vocab_size
      if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f'"prompt" holds a token id outside [0, {vocab})')
      hidden = [run.tokenizer.bos_id] if run.cfg.data.add_bos and prompt[0] != run.tokenizer.bos_id else []
      if len(hidden) + len(prompt) + (max_new or 0) > context:
        raise ApiError(400, f'the prompt of {len(hidden) + len(prompt)} tokens plus "max_tokens"={max_new or 0} '
                            f'exceeds the context of {context} tokens')
      return hidden + prompt, len(hidden)
    try:
      return inference.prompt_tokens(run, prompt, max_new or 1, name='the prompt', flag='"max_tokens"'), 0
    except UserError as e:
      raise ApiError(400, str(e)) from None

  def complete(self, body, chat: bool) -> tuple[openai_api.Parsed, dict]:
    """The parsed request and its answer; an ApiError (400) for a bad request."""
    parsed = openai_api.parse(body, chat, self.template)
    tok = self.run.tokenizer
    prompts = []
    for p in parsed.prompts:
      ids, hidden = self._tokens(p, parsed.max_tokens)
      max_new = parsed.max_tokens if parsed.max_tokens is not None else self.run.context_len - len(ids)
      if max_new < 0 or (parsed.max_tokens is None and max_new < 1):
        raise ApiError(400, f'the prompt of {len(ids)} tokens leaves no room in the context of '
                            f'{self.run.context_len} tokens')
      prompts.append((p, ids, max_new, hidden))
    jobs = []  # (prompt index, sample, future of the completion or None)
    for i, (_, ids, max_new, _) in enumerate(prompts):
      for j in range(parsed.n):
        sampling = replace(parsed.sampling, max_new_tokens=max_new) if max_new else None
        jobs.append((i, j, self.batcher.submit('generate', ids, sampling, j) if max_new else None))
    want_logprobs = parsed.logprobs is not None
    choices, completion_tokens = [], 0
    for index, (i, j, future) in enumerate(jobs):
      text_prompt, ids, _, hidden = prompts[i]
      done = future.result() if future is not None else None
      new = done.tokens if done is not None else []
      completion_tokens += len(new)
      text = done.text if done is not None else ''
      if parsed.echo:
        text = (text_prompt if isinstance(text_prompt, str) else tok.decode(ids)) + text
      logprobs = None
      if want_logprobs and len(ids) + len(new) >= 2:
        s = self.batcher.submit('score', ids + new).result()
        first = hidden if parsed.echo else len(ids)
        lps = [None] + s.logprobs
        tops = [None] + s.top_logprobs
        top_tokens = [None] + s.top_tokens
        shown_prompt = text_prompt if isinstance(text_prompt, str) else tok.decode(ids)
        logprobs = openai_api.logprobs_object(tok, (ids + new)[first:], lps[first:], top_tokens[first:],
                                              tops[first:], parsed.logprobs, offset=0 if parsed.echo else len(shown_prompt))
      reason = done.finish_reason if done is not None else 'length'
      choices.append(openai_api.choice(parsed, index, text, reason, logprobs))
    prompt_tokens = sum(len(ids) for _, ids, _, _ in prompts)
    return parsed, openai_api.response(parsed, self.model_name, choices, prompt_tokens, completion_tokens)

  async def respond(self, body, chat: bool, disconnected=None):
    """The answer to a request: a dict, or for `stream` an async iterator of server-sent-event lines."""
    import anyio
    if self._limiter is None:
      self._limiter = anyio.CapacityLimiter(4096)
    parsed, answer = await anyio.to_thread.run_sync(self.complete, body, chat, limiter=self._limiter)
    if not parsed.stream:
      return answer

    async def events():
      for chunk in openai_api.stream_chunks(parsed, answer):
        yield f'data: {json.dumps(chunk)}\n\n'
      yield 'data: [DONE]\n\n'
    return events()

  # -- the tokenizer, as lm-evaluation-harness's remote tokenizer (and vLLM's API) expose it ----------------

  def tokenizer_info(self) -> dict:
    tok = self.run.tokenizer
    piece = lambda i: tok.id_to_piece(i) if 0 <= i < tok.vocab_size else None  # noqa: E731
    return {'tokenizer_class': 'sentencepiece', 'bos_token': piece(tok.bos_id), 'eos_token': piece(tok.eos_id),
            'pad_token': piece(tok.pad_id), 'unk_token': piece(tok.unk_id), 'add_bos_token': bool(
                self.run.cfg.data.add_bos), 'model_max_length': self.run.context_len,
            'vocab_size': self.run.cfg.model.vocab_size, 'chat_template': None}

  def tokenize(self, body) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get('prompt'), str):
      raise ApiError(400, '"prompt" must be a string')
    special = body.get('add_special_tokens', True)
    if not isinstance(special, bool):
      raise ApiError(400, f'"add_special_tokens" must be a boolean, got {special!r}')
    tok, text = self.run.tokenizer, body['prompt']
    ids = []
    # The special tokens' own strings (tokenizer_info's eos_token, ...) read as those tokens, as Hugging Face
    # tokenizers read them: how a harness finds the EOS id from its string.
    for i, part in enumerate(self._special_split.split(text) if self._special_split else [text]):
      if i % 2:
        ids.append(self._special_ids[part])
      elif part:
        ids.extend(self.run.encode(part))
    if special and self.run.cfg.data.add_bos and tok.bos_id >= 0:
      ids = [tok.bos_id] + ids
    return {'tokens': ids, 'count': len(ids), 'max_model_len': self.run.context_len}

  def detokenize(self, body) -> dict:
    tokens = body.get('tokens') if isinstance(body, dict) else None
    vocab = self.run.cfg.model.vocab_size
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                             for t in tokens)):
      raise ApiError(400, f'"tokens" must be a list of token ids in [0, {vocab})')
    return {'prompt': self.run.text(tokens)}

  def close(self) -> None:
    self.batcher.close()
