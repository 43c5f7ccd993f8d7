"""The OpenAI-compatible request and response bodies of `llm-jax serve`: parsing and checking requests
(`/v1/completions`, `/v1/chat/completions`) into prompts and sampling params, and shaping the answers.

Supported fields: model (ignored: the server serves one run), prompt (a string, a list of strings, a list of
token ids or a list of such lists), messages, max_tokens, temperature, top_p, n, stop (up to 16), seed, stream
(server-sent events as tokens arrive: service.App.stream; stream_options.include_usage adds a last chunk of
usage), echo, logprobs (completions: an integer, up to 5 alternatives; chat: a boolean, with top_logprobs up
to 5, answered in the chat API's own `content` list), and the extensions top_k, min_p, repetition_penalty,
ignore_eos. A field of the wrong type, or a value out of range, is an ApiError (HTTP 400) whose message names
the field; so is a field this server does not implement (logit_bias, best_of, suffix, response_format, tools,
the penalties) set to anything but its inert value.

Chat messages of a run fine-tuned with a chat template (data.objective sft or dpo) are rendered by that
template (data/chat.py: role markers, the reply role's marker last), or by the checkpoint's own Jinja template
when its tokenizer_config.json has one (data/chat_template.py), and generation stops at its end marker;
a role the template does not know is a 400. Any other run's messages are rendered as `role: content` lines
followed by `assistant:`, and generation also stops at a new `user:` line.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from llm_jax.errors import UserError
from llm_jax.infer.sampling import MAX_SEED, SamplingParams


class ApiError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclass
class Parsed:
  prompts: list  # str or list[int] each
  sampling: SamplingParams
  max_tokens: int | None  # 0: score the prompt only (echo); None: as many as the context leaves (chat)
  n: int
  echo: bool
  logprobs: int | None
  stream: bool
  chat: bool
  usage_chunk: bool = False  # stream_options.include_usage: a last chunk of usage, with no choices


_NUMBER = (int, float)
MAX_STOPS = 16
# Fields of the OpenAI API this server does not implement, each with the values that ask for nothing: any
# other value is a 400, since ignoring it would answer a different question than the one asked.
_NOT_SERVED = {
    'logit_bias': (lambda v: v == {}, 'no per-token biases'),
    'best_of': (lambda v: v == 1, 'one sample per choice: use "n"'),
    'suffix': (lambda v: v == '', 'no insertion'),
    'response_format': (lambda v: v == {'type': 'text'}, 'text only: no JSON mode or schema'),
    'tools': (lambda v: v == [], 'no tool calls'),
    'functions': (lambda v: v == [], 'no function calls'),
}


def _field(body: dict, key: str, types, default, check=None, expected: str = ''):
  types = types if isinstance(types, tuple) else (types,)
  value = body.get(key, default)
  if value is None:
    value = default
  if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
    raise ApiError(400, f'"{key}" must be {expected}, got {value!r}')
  if value is not None and check is not None and not check(value):
    raise ApiError(400, f'"{key}" must be {expected}, got {value!r}')
  return value


def _prompts(body: dict) -> list:
  prompt = body.get('prompt')
  bad = ApiError(400, '"prompt" must be a string, a list of strings, a list of token ids, or a list of '
                      'such lists')
  if isinstance(prompt, str):
    return [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise bad
  if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    return [list(prompt)]
  out = []
  for p in prompt:
    if isinstance(p, str):
      out.append(p)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      out.append(list(p))
    else:
      raise bad
  return out


def chat_messages(messages) -> list[tuple[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, '"messages" must be a non-empty list of {"role", "content"} objects')
  out = []
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)):
      raise ApiError(400, f'"messages"[{i}] must be an object with string "role" and "content"')
    out.append((m['role'], m['content']))
  return out


def render_chat(messages) -> str:
  return ''.join(f'{role}: {content}\n' for role, content in chat_messages(messages)) + 'assistant:'


def render_with_template(messages, template) -> list[int]:
  """The prompt ids a run fine-tuned with `template` (data/chat.Template) was trained to answer."""
  pairs = chat_messages(messages)
  for i, (role, _) in enumerate(pairs):
    if role not in template.roles:
      raise ApiError(400, f'"messages"[{i}]: role {role!r} is not one of this run\'s chat roles '
                          f'{list(template.roles)}')
  from llm_jax.data.chat_template import TemplateError
  try:
    return template.prompt(pairs)
  except TemplateError as e:  # the checkpoint's template refused the conversation (raise_exception)
    raise ApiError(400, f'"messages": {e}') from None


def parse(body, chat: bool, template=None) -> Parsed:
  """`template`: the run's chat template, or None for runs trained without one."""
  if not isinstance(body, dict):
    raise ApiError(400, 'the request body must be a JSON object')
  if chat:
    messages = body.get('messages')
    prompts = [render_with_template(messages, template) if template else render_chat(messages)]
  else:
    prompts = _prompts(body)
  default_max = None if chat else 16  # the OpenAI defaults
  max_key = 'max_completion_tokens' if chat and 'max_completion_tokens' in body else 'max_tokens'
  max_tokens = _field(body, max_key, int, default_max, lambda v: v >= 0, 'a non-negative integer')
  stop = body.get('stop')
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  # OpenAI allows 4; harnesses send more (lm-evaluation-harness: a task's `until` strings plus EOS).
  if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f'"stop" must be a non-empty string or a list of up to {MAX_STOPS} of them')
  if chat and template is None:
    stop = stop + ['\nuser:']
  echo = _field(body, 'echo', bool, False, expected='a boolean')
  logprobs = body.get('logprobs')
  if chat:  # a boolean, the alternatives asked apart (the chat API's own shape of the completions' integer)
    wanted = _field(body, 'logprobs', bool, False, expected='a boolean')
    top = _field(body, 'top_logprobs', int, None, lambda v: 0 <= v <= 5, 'an integer from 0 to 5')
    if top is not None and not wanted:
      raise ApiError(400, '"top_logprobs" needs "logprobs": true')
    logprobs = (top or 0) if wanted else None
  else:
    logprobs = _field(body, 'logprobs', int, None, lambda v: 0 <= v <= 5, 'an integer from 0 to 5')
  for key in ('presence_penalty', 'frequency_penalty'):
    if _field(body, key, _NUMBER, 0, expected='a number') != 0:
      raise ApiError(400, f'"{key}" is not supported (use "repetition_penalty")')
  for key, (inert, what) in _NOT_SERVED.items():
    if body.get(key) is not None and not inert(body[key]):
      raise ApiError(400, f'"{key}" is not supported ({what})')
  sampling = SamplingParams(
      temperature=float(_field(body, 'temperature', _NUMBER, 1.0, lambda v: 0 <= v <= 2, 'a number in [0, 2]')),
      top_p=float(_field(body, 'top_p', _NUMBER, 1.0, lambda v: 0 < v <= 1, 'a number in (0, 1]')),
      top_k=_field(body, 'top_k', int, 0, lambda v: v >= 0, 'a non-negative integer'),
      min_p=float(_field(body, 'min_p', _NUMBER, 0.0, lambda v: 0 <= v < 1, 'a number in [0, 1)')),
      repetition_penalty=float(_field(body, 'repetition_penalty', _NUMBER, 1.0, lambda v: v > 0,
                                      'a positive number')),
      max_new_tokens=max(1, max_tokens or 1),
      seed=_field(body, 'seed', int, 0, lambda v: 0 <= v <= MAX_SEED, f'an integer in [0, {MAX_SEED}]'),
      ignore_eos=_field(body, 'ignore_eos', bool, False, expected='a boolean'),  # vLLM's extension: benchmarks
      stop_strings=tuple(stop), stop_tokens=tuple(template.stop_ids) if chat and template else ())
  try:
    sampling.check(flag_prefix='')
  except UserError as e:
    raise ApiError(400, str(e)) from None
  if max_tokens == 0 and not echo:
    raise ApiError(400, '"max_tokens" is 0: nothing to do unless "echo" is true (scoring the prompt)')
  n = _field(body, 'n', int, 1, lambda v: 1 <= v <= 16, 'an integer from 1 to 16')
  stream = _field(body, 'stream', bool, False, expected='a boolean')
  # OpenAI's rule, which clients rely on: the usage chunk (no choices) only when asked for, since the loop in
  # its docs reads chunk.choices[0] of every chunk.
  options = body.get('stream_options')
  if options is not None and not stream:
    raise ApiError(400, '"stream_options" is only for "stream": true')
  if options is not None and not isinstance(options, dict):
    raise ApiError(400, f'"stream_options" must be an object, got {options!r}')
  usage_chunk = options is not None and _field(options, 'include_usage', bool, False, expected='a boolean')
  return Parsed(prompts, sampling, max_tokens, n, echo, logprobs, stream, chat, usage_chunk)


def logprobs_object(tokenizer, tokens, token_logprobs, top_tokens, top_logprobs, k: int, offset: int = 0) -> dict:
  """The completions API's `logprobs`: token strings, their log-probabilities (None for the first token of
  an echoed prompt, which has no context), the `k` top alternatives at each place (most likely first), text
  offsets."""
  strings = [tokenizer.decode([t]) for t in tokens]
  offsets, at = [], offset
  for s in strings:
    offsets.append(at)
    at += len(s)
  tops = [None if lps is None else {tokenizer.decode([t]): lp for t, lp in zip(ts[:k][::-1], lps[:k][::-1])}
          for ts, lps in zip(top_tokens, top_logprobs)]  # reversed: two ids decoding alike keep the likelier
  return {'tokens': strings, 'token_logprobs': token_logprobs, 'top_logprobs': tops, 'text_offset': offsets}


def logprobs_answer(parsed: Parsed, tokenizer, tokens, token_logprobs, tops, offset: int) -> dict:
  """The `logprobs` of these tokens in the request's API: chat's `content` list, or the completions' columns
  with text offsets from `offset`. `tops`: the (ids, log-probabilities) of the alternatives at each token."""
  top_tokens, top_logprobs = [t for t, _ in tops], [lp for _, lp in tops]
  if parsed.chat:
    return chat_logprobs_object(tokenizer, tokens, token_logprobs, top_tokens, top_logprobs, parsed.logprobs)
  return logprobs_object(tokenizer, tokens, token_logprobs, top_tokens, top_logprobs, parsed.logprobs, offset)


def chat_logprobs_object(tokenizer, tokens, token_logprobs, top_tokens, top_logprobs, k: int) -> dict:
  """The chat API's `logprobs`: for each new token its string, log-probability and UTF-8 bytes, and the `k`
  likeliest alternatives in the same shape, most likely first."""
  def entry(token, logprob):
    text = tokenizer.decode([token])
    return {'token': text, 'logprob': logprob, 'bytes': list(text.encode('utf-8'))}
  content = [{**entry(t, lp), 'top_logprobs': [entry(a, b) for a, b in zip(ts[:k], lps[:k])]}
             for t, lp, ts, lps in zip(tokens, token_logprobs, top_tokens, top_logprobs)]
  return {'content': content, 'refusal': None}


def response(parsed: Parsed, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
  kind = 'chatcmpl' if parsed.chat else 'cmpl'
  return {
      'id': f'{kind}-{uuid.uuid4().hex[:24]}',
      'object': 'chat.completion' if parsed.chat else 'text_completion',
      'created': int(time.time()),
      'model': model,
      'choices': choices,
      'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                'total_tokens': prompt_tokens + completion_tokens},
  }


def choice(parsed: Parsed, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
  if parsed.chat:
    return {'index': index, 'message': {'role': 'assistant', 'content': text}, 'logprobs': logprobs,
            'finish_reason': finish_reason}
  return {'index': index, 'text': text, 'logprobs': logprobs, 'finish_reason': finish_reason}
