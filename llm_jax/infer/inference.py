"""A trained run loaded for inference from --workdir alone: config, tokenizer, model, latest params, and the
text side of decoding (prompts to tokens within the context, tokens back to text cut at stop strings) that
`generate`, `serve` and `chat` share.

It is also the Python API (`llm_jax.load(workdir)` returns a Run): `generate` continues prompts, `score` gives
log-likelihoods of continuations, `chat` answers messages. The commands go through these same methods.

An encoder-decoder run (span corruption) reads its prompt as the encoder's input and writes its sentinels
as T5 does, `<extra_id_0>`, `<extra_id_1>`, ..., in prompts and completions alike, so a prompt with a gap
asks the model to fill it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

from llm_jax import sharding
from llm_jax.infer import decode, stops
from llm_jax.run import params as params_lib, workdir as workdir_lib
from llm_jax.errors import UserError
from llm_jax.data import objectives
from llm_jax.models import build_model, family_of
from llm_jax.infer.sampling import SamplingParams


@dataclass
class Run:
  cfg: Any
  tokenizer: Any
  model: Any
  params: Any
  mesh: Any
  rules: Any
  step: int
  workdir: str | None = None  # where it was loaded from (an encoder's sentence-transformers files live there)

  @property
  def context_len(self) -> int:
    """The longest sequence (prompt + new tokens) decoded: the length the model was trained on."""
    return self.cfg.data.seq_len

  @property
  def sentinels(self) -> int:
    return self.cfg.data.num_sentinels if objectives.of(self.cfg.data).sentinels else 0

  def sentinel_id(self, n: int) -> int:
    return objectives.sentinel_id(self.tokenizer.vocab_size, self.sentinels, n)

  def encode(self, text: str) -> list[int]:
    """Text to ids; with sentinels, each `<extra_id_N>` becomes sentinel N."""
    if not self.sentinels:
      return self.tokenizer.encode(text)
    ids = []
    for i, part in enumerate(_SENTINEL.split(text)):
      if i % 2:
        if int(part) >= self.sentinels:
          raise UserError(f'<extra_id_{part}> is not a sentinel of this run (data.num_sentinels={self.sentinels})')
        ids.append(self.sentinel_id(int(part)))
      elif part:
        ids.extend(self.tokenizer.encode(part))
    return ids

  def text(self, ids: Sequence[int]) -> str:
    """Ids to text; with sentinels, each sentinel is written `<extra_id_N>`."""
    if not self.sentinels:
      return self.tokenizer.decode(ids)
    out, run_ = [], []
    low = self.sentinel_id(self.sentinels - 1)
    for i in ids:
      if low <= i < low + self.sentinels:
        out.append(self.tokenizer.decode(run_) + f'<extra_id_{self.sentinel_id(0) - i}>')
        run_ = []
      else:
        run_.append(i)
    return ''.join(out) + self.tokenizer.decode(run_)

  # -- the Python API ---------------------------------------------------------------------------------------

  def generate(self, prompts, params: SamplingParams | None = None, *, num_samples: int = 1,
               truncate: bool = False, batch_size: int = 32, **knobs):
    """Continue a prompt (a Completion: .text, .tokens, .logprobs, .finish_reason) or a list of prompts (a
    list with `num_samples` Completions per prompt, prompt by prompt). Sampling knobs come as `params` or as
    keywords (SamplingParams' fields: max_new_tokens=64, temperature=0 (greedy), top_k, top_p, min_p,
    repetition_penalty, seed, stop_strings, ignore_eos)."""
    one = isinstance(prompts, str)
    texts = [prompts] if one else list(prompts)
    params = params or SamplingParams(**knobs)
    params.check(flag_prefix='')
    ids = [prompt_tokens(self, t, params.max_new_tokens, truncate,
                         name=f'prompt {i + 1}' if len(texts) > 1 else 'the prompt') for i, t in enumerate(texts)]
    jobs = [(i, s) for i in range(len(ids)) for s in range(num_samples)]
    out = []
    for start in range(0, len(jobs), batch_size):
      chunk = jobs[start:start + batch_size]
      out += self.complete([ids[i] for i, _ in chunk], [params] * len(chunk), [s for _, s in chunk])
    return out[0] if one and num_samples == 1 else out

  def score(self, context, continuation=None, *, batch_size: int = 32, progress=None):
    """log p(continuation | context) under the model: for one (context, continuation) pair a float, for a
    list of pairs a list. Tokenised as lm-evaluation-harness does (evaluate/tasks.encode_pair), BOS first if
    the run trains with it; a long context loses its oldest tokens."""
    one = continuation is not None
    pairs = [(context, continuation)] if one else list(context)
    bos = [self.tokenizer.bos_id] if self.cfg.data.add_bos else []
    from llm_jax.evaluate.tasks import encode_pair
    sequences, starts = [], []
    for n, (ctx, cont) in enumerate(pairs):
      context_ids, cont_ids = encode_pair(self.tokenizer, ctx, cont, bos)
      if len(cont_ids) + 1 > self.context_len:
        raise UserError(f'continuation {n + 1}: {len(cont_ids)} tokens do not fit the context of '
                        f'{self.context_len} tokens (data.seq_len)')
      ids = context_ids + cont_ids
      ids = ids[max(0, len(ids) - self.context_len):]
      if len(ids) < 2:
        raise UserError(f'continuation {n + 1} is one token after an empty context and the run adds no BOS '
                        '(data.add_bos=false): nothing predicts it')
      sequences.append(ids)
      starts.append(len(ids) - len(cont_ids))
    from llm_jax.infer import loglik
    scores = loglik.score(self.engine, sequences, batch_size, progress=progress)
    # Scores.logprobs[t] is the log-probability of token t + 1, so a continuation at s is logprobs[s - 1:];
    # one at 0 (an empty context, no BOS) is logprobs[0:]: every token of it but the first, which nothing
    # predicts (evaluate/tasks.py counts those).
    out = [sum(sc.logprobs[max(start - 1, 0):]) for sc, start in zip(scores, starts)]
    return out[0] if one else out

  @functools.cached_property
  def chat_template(self):
    """The checkpoint's own chat template (tokenizer_config.json), else the built-in one of a run fine-tuned
    with it (a chat objective), else None."""
    from llm_jax.data import chat
    return chat.template_for(self.cfg.data, self.tokenizer, objectives.of(self.cfg.data).chat)

  def chat(self, messages, params: SamplingParams | None = None, **knobs) -> str:
    """The reply to `messages` ((role, content) pairs or {"role", "content"} dicts) of a run fine-tuned with a
    chat template, decoded until the template's end marker (knobs as in `generate`)."""
    template = self.chat_template
    if template is None:
      raise UserError(f'chat: this run was trained with data.objective={self.cfg.data.objective!r} and has no chat '
                      'template; fine-tune it first (--config=sft with --config.init_from)')
    pairs = [(m['role'], m['content']) if isinstance(m, dict) else tuple(m) for m in messages]
    for role, _ in pairs:
      if role not in template.roles:
        raise UserError(f'chat: role {role!r} is not one of this run\'s chat roles {list(template.roles)}')
    params = dataclasses.replace(params or SamplingParams(**knobs), stop_tokens=tuple(template.stop_ids))
    params.check(flag_prefix='')
    ids = template.prompt(pairs)
    if len(ids) + params.max_new_tokens > self.context_len:
      raise UserError(f'chat: the conversation is {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} '
                      f'it does not fit the context of {self.context_len} tokens (data.seq_len)')
    [done] = self.complete([ids], [params])
    return done.text

  def complete(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               samples: Sequence[int] | None = None) -> list['Completion']:
    """Token-id prompts, each with its own sampling params, decoded together (what the others call)."""
    return complete(self, prompts, params, samples)
  def embed(self, texts: Sequence[str]):
    """Sentence embeddings of an encoder run: an array [len(texts), dim], one row per text
    (retrieval/embeddings.py)."""
    from llm_jax.retrieval import embeddings
    return embeddings.embed(self, texts)

  @functools.cached_property
  def engine(self) -> decode.Engine:
    return decode.Engine(self.model, self.params, eos_id=self.tokenizer.eos_id, mesh=self.mesh,
                         rules=self.rules, token_bytes=stops.token_bytes(self.tokenizer, self.cfg.model.vocab_size))


_SENTINEL = re.compile(r'<extra_id_(\d+)>')


def load_run(workdir: str) -> Run:
  cfg = workdir_lib.load_config(workdir)
  tok = workdir_lib.load_tokenizer(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  step, params = params_lib.restore(workdir, mesh, rules, cfg)
  return Run(cfg, tok, build_model(cfg.model), params, mesh, rules, step, workdir)


def prompt_tokens(run: Run, text: str, max_new_tokens: int, truncate: bool = False,
                  name: str = 'the prompt', flag: str = '--max_new_tokens') -> list[int]:
  """`text` as the model's input ids (BOS first if the run trains with it), checked to leave room for
  `max_new_tokens` in the context; with `truncate`, the oldest tokens (after BOS) are dropped instead.
  An encoder-decoder's prompt (with EOS, as span corruption ends its inputs) must fit the encoder's rows
  (data.seq_len) and the new tokens the decoder's (data.target_len)."""
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:  # bytes that were not UTF-8, smuggled in as lone surrogates (argv, stdin, JSON)
    raise UserError(f'{name} is not valid UTF-8 text') from None
  if family_of(run.cfg.model).two_stacks:
    return _encoder_prompt(run, text, max_new_tokens, truncate, name, flag)
  body = run.tokenizer.encode(text)
  # A prompt that writes the BOS token itself (a chat template's rendering does) gets no second one.
  written = run.tokenizer.bos_id >= 0 and body[:1] == [run.tokenizer.bos_id]
  bos = [run.tokenizer.bos_id] if run.cfg.data.add_bos or written else []
  ids = bos + body[int(written):]
  context = run.context_len
  room = context - max_new_tokens
  if room < len(bos) + 1:
    raise UserError(f'{flag}={max_new_tokens} leaves no room for a prompt in the context of {context} '
                    'tokens (data.seq_len of the run)')
  if len(ids) > room:
    if not truncate:
      raise UserError(f'{name} is {len(ids)} tokens; with {flag}={max_new_tokens} the context of {context} '
                      f'tokens (data.seq_len) leaves room for {room}: shorten it, ask for fewer new tokens, '
                      'or truncate it from the left (--truncate)')
    ids = bos + ids[len(ids) - (room - len(bos)):]
  return ids


def _encoder_prompt(run: Run, text: str, max_new_tokens: int, truncate: bool, name: str, flag: str) -> list[int]:
  d = run.cfg.data
  if max_new_tokens > d.target_len:
    raise UserError(f'{flag}={max_new_tokens} is more than the decoder\'s {d.target_len} tokens (data.target_len '
                    'of the run)')
  ids = run.encode(text) + [run.tokenizer.eos_id]
  if len(ids) > d.seq_len:
    if not truncate:
      raise UserError(f'{name} is {len(ids)} tokens; the encoder reads {d.seq_len} (data.seq_len): shorten it or '
                      'truncate it from the left (--truncate)')
    ids = ids[len(ids) - d.seq_len:]
  return ids


@dataclass
class Completion:
  text: str  # the new text, without a stop string or stop token that ended it
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str  # 'stop' or 'length'
  prompt_tokens: int = 0  # how many tokens the model read before these


def to_completion(run: Run, result: decode.Result, params: SamplingParams, prompt_len: int = 0) -> Completion:
  tokens = result.tokens
  shown = tokens
  if result.finish_reason == 'stop' and tokens and (tokens[-1] in params.stop_tokens or
                                                    (tokens[-1] == run.tokenizer.eos_id and not params.ignore_eos)):
    shown = tokens[:-1]
  text = run.text(shown)
  if params.stop_strings:
    text, _ = stops.cut(text, params.stop_strings)
  return Completion(text, tokens, result.logprobs, result.finish_reason, prompt_len)


def complete(run: Run, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             samples: Sequence[int] | None = None) -> list[Completion]:
  """One batch of prompts (token ids), each with its own sampling params, decoded together."""
  samples = samples or [0] * len(prompts)
  requests = [decode.Request(tuple(p), s, i) for p, s, i in zip(prompts, params, samples)]
  return [to_completion(run, r, s, len(p)) for r, s, p in zip(run.engine.generate(requests), params, prompts)]
