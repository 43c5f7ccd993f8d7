"""A trained run loaded for inference from --workdir alone: config, tokenizer, model, latest params, and the
text side of decoding (prompts to tokens within the context, tokens back to text cut at stop strings) that
`generate`, `serve` and `chat` share."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from llm_jax import decode, sharding, stops, workdir as workdir_lib
from llm_jax.checkpoint import open_for_reading
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.sampling import SamplingParams
from llm_jax.train.state import abstract_params


@dataclass
class Run:
  cfg: Any
  tokenizer: Any
  model: Any
  params: Any
  mesh: Any
  rules: Any
  step: int

  @property
  def context_len(self) -> int:
    """The longest sequence (prompt + new tokens) decoded: the length the model was trained on."""
    return self.cfg.data.seq_len

  @functools.cached_property
  def engine(self) -> decode.Engine:
    return decode.Engine(self.model, self.params, eos_id=self.tokenizer.eos_id, mesh=self.mesh,
                         rules=self.rules, token_bytes=stops.token_bytes(self.tokenizer, self.cfg.model.vocab_size))


def load_run(workdir: str) -> Run:
  cfg = workdir_lib.load_config(workdir)
  tok = workdir_lib.load_tokenizer(workdir, cfg)
  ckpt = open_for_reading(workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  try:
    step, params = ckpt.restore_latest_params(abstract_params(model, mesh, rules))
  finally:
    ckpt.close()
  return Run(cfg, tok, model, params, mesh, rules, step)


def prompt_tokens(run: Run, text: str, max_new_tokens: int, truncate: bool = False,
                  name: str = 'the prompt', flag: str = '--max_new_tokens') -> list[int]:
  """`text` as the model's input ids (BOS first if the run trains with it), checked to leave room for
  `max_new_tokens` in the context; with `truncate`, the oldest tokens (after BOS) are dropped instead."""
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:  # bytes that were not UTF-8, smuggled in as lone surrogates (argv, stdin, JSON)
    raise UserError(f'{name} is not valid UTF-8 text') from None
  bos = [run.tokenizer.bos_id] if run.cfg.data.add_bos else []
  ids = bos + run.tokenizer.encode(text)
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


@dataclass
class Completion:
  text: str  # the new text, without a stop string or stop token that ended it
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str  # 'stop' or 'length'


def to_completion(run: Run, result: decode.Result, params: SamplingParams) -> Completion:
  tokens = result.tokens
  shown = tokens
  if result.finish_reason == 'stop' and tokens and (tokens[-1] in params.stop_tokens or
                                                    (tokens[-1] == run.tokenizer.eos_id and not params.ignore_eos)):
    shown = tokens[:-1]
  text = run.tokenizer.decode(shown)
  if params.stop_strings:
    text, _ = stops.cut(text, params.stop_strings)
  return Completion(text, tokens, result.logprobs, result.finish_reason)


def complete(run: Run, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             samples: Sequence[int] | None = None) -> list[Completion]:
  """One batch of prompts (token ids), each with its own sampling params, decoded together."""
  samples = samples or [0] * len(prompts)
  requests = [decode.Request(tuple(p), s, i) for p, s, i in zip(prompts, params, samples)]
  return [to_completion(run, r, s) for r, s in zip(run.engine.generate(requests), params)]
