"""A trained run loaded for inference from --workdir alone: config, tokenizer, model, latest params, and the
text side of decoding (prompts to tokens within the context, tokens back to text cut at stop strings) that
`generate`, `serve` and `chat` share.

An encoder-decoder run (span corruption) reads its prompt as the encoder's input and writes its sentinels
as T5 does, `<extra_id_0>`, `<extra_id_1>`, ..., in prompts and completions alike, so a prompt with a gap
asks the model to fill it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax

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

  @property
  def sentinels(self) -> int:
    return self.cfg.data.num_sentinels if self.cfg.data.objective == 'span' else 0

  def sentinel_id(self, n: int) -> int:
    return self.tokenizer.vocab_size + self.sentinels - 1 - n  # objectives.for_config's numbering

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

  @functools.cached_property
  def engine(self) -> decode.Engine:
    return decode.Engine(self.model, self.params, eos_id=self.tokenizer.eos_id, mesh=self.mesh,
                         rules=self.rules, token_bytes=stops.token_bytes(self.tokenizer, self.cfg.model.vocab_size))


_SENTINEL = re.compile(r'<extra_id_(\d+)>')


def load_run(workdir: str) -> Run:
  cfg = workdir_lib.load_config(workdir)
  tok = workdir_lib.load_tokenizer(workdir, cfg)
  ckpt = open_for_reading(workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  try:
    step, params = restore_params(cfg, ckpt, abstract_params(model, mesh, rules), mesh, rules)
  finally:
    ckpt.close()
  return Run(cfg, tok, model, params, mesh, rules, step)


def restore_params(cfg, ckpt, abstract, mesh, rules) -> tuple[int, Any]:
  """(step, params) of the newest step that reads; a LoRA run's checkpoints hold adapters only, joined here
  to init_from's base."""
  if not cfg.model.lora.rank:
    return ckpt.restore_latest_params(abstract)
  from llm_jax import finetune, lora
  base_abstract, adapter_abstract = lora.split(abstract)
  base, _ = finetune.load_params(cfg, mesh, rules, jax.tree.map(lambda a: a.sharding, base_abstract))
  step, adapters = ckpt.restore_latest_params(adapter_abstract)
  return step, lora.merge(base, adapters)


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
  if run.cfg.model.family == 'encdec':
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


def to_completion(run: Run, result: decode.Result, params: SamplingParams) -> Completion:
  tokens = result.tokens
  shown = tokens
  if result.finish_reason == 'stop' and tokens and (tokens[-1] in params.stop_tokens or
                                                    (tokens[-1] == run.tokenizer.eos_id and not params.ignore_eos)):
    shown = tokens[:-1]
  text = run.text(shown)
  if params.stop_strings:
    text, _ = stops.cut(text, params.stop_strings)
  return Completion(text, tokens, result.logprobs, result.finish_reason)


def complete(run: Run, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             samples: Sequence[int] | None = None) -> list[Completion]:
  """One batch of prompts (token ids), each with its own sampling params, decoded together."""
  samples = samples or [0] * len(prompts)
  requests = [decode.Request(tuple(p), s, i) for p, s, i in zip(prompts, params, samples)]
  return [to_completion(run, r, s) for r, s in zip(run.engine.generate(requests), params)]


def require_family(cfg, command: str, families: tuple[str, ...], why: str = '') -> None:
  """A one-line error when a command does not apply to the run's model family."""
  family = cfg.model.family
  if family in families:
    return
  if not why and family == 'encoder':
    why = 'a masked-LM encoder does not generate text; `llm-jax eval` reports its masked-token loss and accuracy'
  why = why or f'{command} is for model.family {" or ".join(repr(f) for f in families)}'
  raise UserError(f'{command}: this run has model.family={family!r}: {why}')
