"""What `llm-jax serve` does with a request, apart from HTTP (server.py): the OpenAI body checked and turned
into engine jobs, and the tokens that come back turned into the OpenAI answer, whole or streamed.

Every continuation (a prompt times `n`) is a job of the continuous-batching engine (infer/slots.py), which
calls back with each new token; the request's coroutine drains them from its inbox (_Inbox), woken once per
decode step at most. A streamed choice shows its text as it grows, less what may still turn into a stop
string; the final text is what inference.to_completion makes of the tokens, exactly as for the offline path,
so streaming and not give the same text. `echo` + `logprobs` score the prompt through the same engine thread.
A request that is not valid JSON or has a bad field is an ApiError (400) before any device work; a client that
goes away cancels its jobs (their slots are freed before the next step); a failure on the device fails the
requests in it (500) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace

from llm_jax.errors import UserError
from llm_jax.infer import decode, inference, slots, stops
from llm_jax.serve import openai_api, tokenizer_api
from llm_jax.serve.openai_api import ApiError

POLL_S = 0.5  # how often a waiting request checks that its client is still there


@dataclass(eq=False)
class _Choice:
  index: int
  prompt: object  # the prompt as sent: text or ids
  ids: list[int]  # what the model reads
  hidden: int  # leading ids the client did not send (an implicit BOS)
  max_new: int
  sampling: object = None
  job: object = None
  tokens: list = field(default_factory=list)
  logprobs: list = field(default_factory=list)
  tops: list = field(default_factory=list)  # (ids, logprobs) of the top alternatives at each new token
  reason: str | None = None
  shown: str = ''  # the text streamed so far
  lp_sent: int = 0  # new tokens whose log-probabilities have been streamed
  lp_at: int = 0  # the text offset of the next token streamed with its log-probabilities (completions)
  passages: list | None = None  # serve --retrieve: the passages put into this choice's prompt


class _Inbox:
  """Engine events for one request's coroutine. The engine's thread appends (a deque's append is atomic) and
  wakes the coroutine at most once until it next drains: a streamed request is woken once per decode step
  whatever its number of choices, a whole answer only when a choice is done, instead of one event-loop
  wakeup (a write to its self-pipe) per token per choice."""

  def __init__(self, loop, wake_on_tokens: bool):
    self.loop, self.wake_on_tokens = loop, wake_on_tokens
    self.events: deque = deque()
    self.ready = asyncio.Event()
    self._armed = True

  def put(self, *event) -> None:  # the engine's thread
    self.events.append(event)
    # Appended before the check, drained after re-arming (below): no event is left without a wakeup.
    if self._armed and (self.wake_on_tokens or event[0] == 'done'):
      self._armed = False
      self.loop.call_soon_threadsafe(self.ready.set)

  async def drain(self, timeout: float | None = None) -> list:
    """The events so far, after waiting (up to `timeout` seconds; then maybe none) for a wakeup."""
    try:
      await asyncio.wait_for(self.ready.wait(), timeout)
    except asyncio.TimeoutError:
      pass
    self.ready.clear()
    self._armed = True
    out = []
    while self.events:
      out.append(self.events.popleft())
    return out


class App:
  """Turns requests into engine jobs and their tokens into OpenAI responses. `max_batch`: decode slots."""

  def __init__(self, run: inference.Run, model_name: str, max_batch: int = 32, batch_wait_s: float = 0.005,
               retriever=None, warm: bool = False):
    self.run, self.model_name = run, model_name
    self.retriever = retriever  # retrieval/context.Retriever: passages go into prompts (serve --retrieve)
    self.engine = slots.SlotEngine(run.engine, run.context_len, max_batch, batch_wait_s)
    if warm:  # before the engine's thread has work: nothing else touches the state yet
      self.engine.warm()
    self.template = run.chat_template  # a fine-tuned run's renders /v1/chat/completions
    self.tokenizer = tokenizer_api.TokenizerApi(run)  # /tokenizer_info, /tokenize, /detokenize

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

  def prepare(self, body, chat: bool) -> tuple[openai_api.Parsed, list[_Choice]]:
    """The parsed request and its choices; an ApiError (400) for a bad request, before any device work."""
    parsed = openai_api.parse(body, chat, self.template)
    passages = None
    if self.retriever is not None:
      from llm_jax.retrieval import context
      body, passages = context.augment_request(self.retriever, self.run, body, chat, parsed.max_tokens,
                                               self.template)
      parsed = openai_api.parse(body, chat, self.template)
    choices = []
    for k, p in enumerate(parsed.prompts):
      ids, hidden = self._tokens(p, parsed.max_tokens)
      max_new = parsed.max_tokens if parsed.max_tokens is not None else self.run.context_len - len(ids)
      if max_new < 0 or (parsed.max_tokens is None and max_new < 1):
        raise ApiError(400, f'the prompt of {len(ids)} tokens leaves no room in the context of '
                            f'{self.run.context_len} tokens')
      for sample in range(parsed.n):
        sampling = replace(parsed.sampling, max_new_tokens=max_new) if max_new else None
        choices.append(_Choice(len(choices), p, ids, hidden, max_new, sampling,
                               passages=None if passages is None else passages[k]))
    return parsed, choices

  def _start(self, parsed, choices: list[_Choice], inbox: _Inbox) -> int:
    """Submit every choice that generates; the number submitted. Events arrive in `inbox`. The engine computes
    each token's log-probability and alternatives only if the request asks for logprobs."""
    n, logprobs = parsed.n, parsed.logprobs is not None
    started = 0
    for c in choices:
      if not c.max_new:
        c.reason = 'length'
        continue
      put = inbox.put
      c.job = self.engine.submit(slots.Job(
          c.ids, c.sampling, c.index % n,
          on_token=lambda t, lp, top, top_lp, c=c, put=put: put('token', c, t, lp, top, top_lp),
          on_done=lambda reason, error, c=c, put=put: put('done', c, reason, error), logprobs=logprobs))
      started += 1
    return started

  @staticmethod
  def _cancel(choices) -> None:
    for c in choices:
      if c.job is not None:
        c.job.cancel()

  @staticmethod
  def _take(event) -> _Choice:
    """Apply one engine event to its choice; an error becomes this request's failure."""
    kind, c, *rest = event
    if kind == 'token':
      token, lp, top, top_lp = rest
      c.tokens.append(token)
      c.logprobs.append(lp)
      c.tops.append((top, top_lp))
    else:
      reason, error = rest
      if error is not None:
        raise error
      c.reason = reason or 'length'
    return c

  async def answer(self, parsed, choices, disconnected=None) -> dict | None:
    """The whole answer, or None if the client went away first (its jobs are cancelled)."""
    inbox = _Inbox(asyncio.get_running_loop(), wake_on_tokens=False)
    try:
      remaining = self._start(parsed, choices, inbox)
      checked = time.monotonic()
      while remaining:
        events = await inbox.drain(POLL_S)
        # Every POLL_S whether tokens came or not: a whole answer's inbox fills with tokens at every step, and
        # checking only on an empty drain let a client that had left keep its slot until its last token.
        if disconnected is not None and time.monotonic() - checked >= POLL_S:
          checked = time.monotonic()
          if await disconnected():
            return None
        for event in events:
          remaining -= event[0] == 'done'
          self._take(event)
    finally:
      self._cancel(choices)
    out = [openai_api.choice(parsed, c.index, self._text(parsed, c), c.reason, await self._logprobs(parsed, c))
           for c in choices]
    for c, o in zip(choices, out):
      if c.passages is not None:  # the passages put into the prompt this choice answers
        o['passages'] = c.passages
    return openai_api.response(parsed, self.model_name, out, self._prompt_tokens(parsed, choices),
                               sum(len(c.tokens) for c in choices))

  @staticmethod
  def _prompt_tokens(parsed, choices) -> int:
    return sum(len(c.ids) for c in choices[::parsed.n])

  def _final(self, c: _Choice) -> str:
    if not c.tokens:
      return ''
    result = decode.Result(c.tokens, c.logprobs, c.reason)
    return inference.to_completion(self.run, result, c.sampling).text

  def _shown_prompt(self, c: _Choice) -> str:
    return c.prompt if isinstance(c.prompt, str) else self.run.text(c.ids[c.hidden:])

  def _text(self, parsed, c: _Choice) -> str:
    return (self._shown_prompt(c) if parsed.echo else '') + self._final(c)

  async def _logprobs(self, parsed, c: _Choice) -> dict | None:
    """The whole answer's log-probabilities: an echoed prompt's own (completions), then the new tokens'."""
    if parsed.logprobs is None:
      return None
    tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.tops)
    if parsed.echo and not parsed.chat:  # chat's are the new message's tokens only, echo or not
      p_tokens, p_lps, p_tops = await self._prompt_logprobs(c)
      tokens, lps, tops = p_tokens + tokens, p_lps + lps, p_tops + tops
    offset = 0 if parsed.echo else len(self._shown_prompt(c))
    return openai_api.logprobs_answer(parsed, self.run.tokenizer, tokens, lps, tops, offset)

  async def _prompt_logprobs(self, c: _Choice) -> tuple[list, list, list]:
    """An echoed prompt's tokens, their log-probabilities (None for the first, which has no context) and
    alternatives, scored by the model through the engine's thread."""
    lps, tops = [None], [(None, None)]
    if len(c.ids) >= 2:
      [s] = await asyncio.wrap_future(self.engine.score([c.ids]))
      lps += s.logprobs
      tops += list(zip(s.top_tokens, s.top_logprobs))
    return c.ids[c.hidden:], lps[c.hidden:], tops[c.hidden:]

  def _next_logprobs(self, parsed, c: _Choice) -> dict | None:
    """The log-probabilities of `c`'s new tokens not streamed yet (None if none or not asked for): they go
    with the chunk that follows them, even while their text is held back for a possible stop string."""
    if parsed.logprobs is None or c.lp_sent == len(c.tokens):
      return None
    a, b = c.lp_sent, len(c.tokens)
    c.lp_sent = b
    out = openai_api.logprobs_answer(parsed, self.run.tokenizer, c.tokens[a:b], c.logprobs[a:b], c.tops[a:b],
                                     c.lp_at)
    if not parsed.chat:
      c.lp_at = out['text_offset'][-1] + len(out['tokens'][-1])
    return out

  # -- streaming ---------------------------------------------------------------------------------------------

  def _delta(self, c: _Choice, final: bool) -> str:
    """The text of `c` not streamed yet: all of it at the end, else what can no longer become a stop string."""
    if final:
      text = self._final(c)
    else:
      text = self.run.text(c.tokens)
      stop = c.sampling.stop_strings
      if stop:
        text, _ = stops.cut(text, stop)
        text = text[:len(text) - stops.held_back(text, stop)]
    if not text.startswith(c.shown):
      return ''
    delta, c.shown = text[len(c.shown):], text
    return delta

  async def stream(self, parsed, choices):
    """Server-sent events: a chunk per new piece of text of each choice (with its tokens' log-probabilities if
    asked), its finish reason, then usage (if stream_options.include_usage) and [DONE]. The jobs start when
    the response does; closing the stream (the client left) cancels them."""
    inbox = _Inbox(asyncio.get_running_loop(), wake_on_tokens=True)
    head = {'id': f'{"chatcmpl" if parsed.chat else "cmpl"}-{uuid.uuid4().hex[:24]}', 'created': int(time.time()),
            'model': self.model_name, 'object': 'chat.completion.chunk' if parsed.chat else 'text_completion'}

    def event(c, text=None, reason=None, logprobs=None, role=False):
      if parsed.chat:
        delta = ({'role': 'assistant'} if role else {}) | ({'content': text} if text is not None else {})
        one = {'index': c.index, 'delta': delta, 'logprobs': logprobs, 'finish_reason': reason}
      else:
        one = {'index': c.index, 'text': text or '', 'logprobs': logprobs, 'finish_reason': reason}
      return f'data: {json.dumps({**head, "choices": [one]})}\n\n'

    try:
      remaining = self._start(parsed, choices, inbox)
      for c in choices:
        c.lp_at = 0 if parsed.echo else len(self._shown_prompt(c))
        if parsed.chat:
          yield event(c, '', role=True)
        if parsed.echo:
          prompt_logprobs = None
          if parsed.logprobs is not None and not parsed.chat:
            prompt_logprobs = openai_api.logprobs_answer(parsed, self.run.tokenizer,
                                                         *await self._prompt_logprobs(c), 0)
            c.lp_at = sum(len(t) for t in prompt_logprobs['tokens'])
          yield event(c, self._shown_prompt(c), logprobs=prompt_logprobs)
        if c.job is None:
          yield event(c, '', c.reason, self._next_logprobs(parsed, c))
      while remaining:
        grown = {}  # the choices with new tokens in this batch of events, in order
        for ev in await inbox.drain():
          try:
            c = self._take(ev)
          except Exception as e:  # noqa: BLE001 - headers are sent: the failure goes into the stream
            yield f'data: {json.dumps({"error": {"message": f"{type(e).__name__}: {e}", "code": 500}})}\n\n'
            return
          if ev[0] == 'token':
            grown[c.index] = c
            continue
          grown.pop(c.index, None)
          remaining -= 1
          yield event(c, self._delta(c, final=True), c.reason, self._next_logprobs(parsed, c))
        for c in grown.values():
          delta = self._delta(c, final=False)
          if delta:
            yield event(c, delta, logprobs=self._next_logprobs(parsed, c))
      if parsed.usage_chunk:
        prompt, completion = self._prompt_tokens(parsed, choices), sum(len(c.tokens) for c in choices)
        usage = {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}
        yield f'data: {json.dumps({**head, "choices": [], "usage": usage})}\n\n'
      yield 'data: [DONE]\n\n'
    finally:
      self._cancel(choices)

  async def respond(self, body, chat: bool, disconnected=None):
    """The answer to a request: a dict, or for `stream` an async iterator of server-sent-event lines."""
    parsed, choices = self.prepare(body, chat)
    if parsed.stream:
      return self.stream(parsed, choices)
    answer = await self.answer(parsed, choices, disconnected)
    if answer is None:
      raise ApiError(499, 'the client closed the connection')
    return answer

  def complete(self, body, chat: bool) -> tuple[openai_api.Parsed, dict]:
    """The parsed request and its whole answer, from plain Python (tests, scripts)."""
    async def run():
      parsed, choices = self.prepare(body, chat)
      return parsed, await self.answer(parsed, choices)
    return asyncio.run(run())

  def close(self) -> None:
    self.engine.close()
