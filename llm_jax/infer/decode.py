"""Decoding: prefill the prompts into a KV cache and sample token by token, all in one compiled program.

Letters as in models/layers.py; P prompt length (padded), N new tokens (steps), K stop tokens, S stop strings,
Q stop-string automaton states.

One jit holds the prefill and a `lax.while_loop` over the steps: no Python runs per token. Rows of a batch
are independent requests: each has its own prompt length (prompts are right-padded; every row writes its
cache at its own positions, so a row's first new token overwrites the padding after its prompt), its own
sampling knobs, seed, `max_new_tokens`, stop tokens and stop strings (stops.py). The loop ends when every row
has finished. Batches are padded to a power of two that the mesh's batch shards divide, so any number of
requests runs on any mesh and a few compiled programs serve them all.

A model family plugs in through an adapter with four methods, so the same loop (and beam search) drives it:

    init_cache(batch, prompt_len, steps) -> cache pytree, already constrained to its logical axes
    prefill(params, prompt_BP, lengths_B, cache) -> (logits_BV of the first new token, cache, start_B)
        start_B: the position the first new token is fed at. A decoder-only model runs the prompt and
        starts at its length. An encoder-decoder encodes the prompt once into a cross-attention cache,
        runs its start token, and starts at 1.
    step(params, tokens_B, positions_B, cache) -> (logits_BV, cache)
    reorder(cache, rows_B) -> cache whose row b is row rows_B[b] of the input (beam search)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.infer import sampling, stops
from llm_jax.models import cache_axes, cache_rows_axis, encdec, family_of, init_cache
from llm_jax.models.transformer import position_rows, project
from llm_jax.infer.sampling import SamplingParams, Stages

Array = jax.Array

__all__ = ['Engine', 'Request', 'Result', 'SamplingParams', 'adapter_for']

FINISH_REASONS = {1: 'stop', 2: 'length'}


@dataclass(frozen=True)
class Request:
  tokens: tuple[int, ...]
  sampling: SamplingParams = field(default_factory=SamplingParams)
  sample: int = 0  # which of several samples of one prompt: folded into the seed


@dataclass
class Result:
  tokens: list[int]  # new tokens, up to and including the stop token or the token that ends a stop string
  logprobs: list[float]  # of each new token under the model (before penalty, temperature, truncation)
  finish_reason: str  # 'stop' (EOS, a stop token or a stop string) or 'length' (max_new_tokens)


def constrain_cache(cache):
  """Every array of a cache pinned to its logical axes (models.cache_axes: by its name, stacked or a layer's own)."""
  return jax.tree_util.tree_map_with_path(lambda path, a: sharding.constrain(a, cache_axes(path[-1].key, a)), cache)


def reorder_cache(cache, rows_B: Array):
  """The cache whose row b is row rows_B[b] of `cache` (beam search)."""
  return constrain_cache(jax.tree.map(lambda a: jnp.take(a, rows_B, axis=cache_rows_axis(a)), cache))


def cache_rows_count(cache) -> int:
  """How many rows (batch rows, decode slots) a cache holds."""
  a = jax.tree.leaves(cache)[0]
  return a.shape[cache_rows_axis(a)]


def put_cache_rows(cache, rows, start):
  """`cache` with rows from `start` on replaced by `rows` (a cache of fewer rows; `start` may be traced)."""
  return constrain_cache(jax.tree.map(
      lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r.astype(a.dtype), start, axis=cache_rows_axis(a)),
      cache, rows))


@dataclass(frozen=True)
class DecoderOnly:
  """The adapter of the decoder-only family (models/decoder.py)."""
  model: Any

  def init_cache(self, batch: int, prompt_len: int, steps: int):
    return constrain_cache(init_cache(self.model.cfg, batch, prompt_len + steps))

  def prefill(self, params, prompt_BP: Array, lengths_B: Array, cache):
    B, P = prompt_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    (x_BPD, unembed_DV), cache = self.model.apply({'params': params}, prompt_BP, positions_BP,
                                                  jnp.ones_like(prompt_BP), cache=cache, prefill=True,
                                                  return_hidden=True)
    # Only the last prompt token's logits are wanted: project that one position, not all P (a P x V matmul
    # was the largest op of a short prefill).
    last_B1D = jnp.take_along_axis(x_BPD, (lengths_B - 1)[:, None, None], axis=1)
    cfg = self.model.cfg
    last_BV = project(last_B1D, unembed_DV, jnp.dtype(cfg.logits_dtype), cfg.final_logit_softcap)[:, 0]
    return last_BV, cache, lengths_B

  def step(self, params, tokens_B: Array, positions_B: Array, cache):
    logits_B1V, cache = self.model.apply({'params': params}, tokens_B[:, None], positions_B[:, None],
                                         jnp.ones_like(tokens_B)[:, None], cache=cache)
    return logits_B1V[:, 0], constrain_cache(cache)

  def reorder(self, cache, rows_B: Array):
    return reorder_cache(cache, rows_B)


@dataclass(frozen=True)
class EncoderDecoder:
  """The adapter of the encoder-decoder family (models/encdec.py): the prompt is the encoder's input,
  encoded once by the prefill, which also fills every decoder layer's cross-attention keys and values and
  decodes the start token at position 0; each step then feeds one token to the decoder alone."""
  model: Any

  def init_cache(self, batch: int, prompt_len: int, steps: int):
    cache = encdec.init_cache(self.model.cfg, batch, prompt_len, steps)
    return constrain_cache(cache)

  def prefill(self, params, prompt_BP: Array, lengths_B: Array, cache):
    B, P = prompt_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segments_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)  # 0 marks the prompt's padding
    start_B1 = jnp.full((B, 1), self.model.cfg.decoder_start_id, jnp.int32)
    logits_B1V, cache = self.model.apply({'params': params}, prompt_BP, positions_BP, segments_BP, start_B1,
                                         jnp.zeros((B, 1), jnp.int32), jnp.ones((B, 1), jnp.int32), cache=cache)
    return logits_B1V[:, 0], constrain_cache(cache), jnp.ones((B,), jnp.int32)

  def step(self, params, tokens_B: Array, positions_B: Array, cache):
    logits_B1V, cache = self.model.apply({'params': params}, None, None, None, tokens_B[:, None],
                                         positions_B[:, None], jnp.ones_like(tokens_B)[:, None], cache=cache,
                                         step=True)
    return logits_B1V[:, 0], constrain_cache(cache)

  def reorder(self, cache, rows_B: Array):
    return reorder_cache(cache, rows_B)


def adapter_for(model):
  family = family_of(model.cfg)
  if not family.generates:
    raise ValueError(f'no decode adapter for model family {family.name!r}')  # require_family says it first
  return EncoderDecoder(model) if family.two_stacks else DecoderOnly(model)


def _decode(adapter, mesh, rules, params, prompt_BP, lengths_B, max_new_B, knobs, sample_B, stop_ids_BK,
            stop_table_SQV, stop_len_S, stop_mask_BS, *, stages: Stages, with_strings: bool, steps: int,
            vocab: int):
  with sharding.activation_sharding(mesh, rules):
    B, P = prompt_BP.shape
    rows_B = jnp.arange(B)
    cache = adapter.init_cache(B, P, steps)
    logits_BV, cache, start_B = adapter.prefill(params, prompt_BP, lengths_B, cache)
    keys_B = sampling.row_keys(knobs['seed'], sample_B)
    seen_BV = None
    if stages.penalty:  # CTRL penalises the prompt's tokens too
      in_prompt_BP = jnp.arange(P)[None, :] < lengths_B[:, None]
      seen_BV = jnp.zeros((B, vocab), bool).at[rows_B[:, None], prompt_BP].max(in_prompt_BP)
    S = stop_len_S.shape[0]

    def choose(i, logits_BV, seen_BV, string_state_BS, count_B, done_B, finish_B):
      step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
      token_B = sampling.next_tokens(logits_BV, step_keys_B, knobs, seen_BV, stages)
      token_B = jnp.where(done_B, 0, token_B)
      logprob_B = sampling.logprobs_of(logits_BV, token_B)
      count_B = count_B + (~done_B).astype(jnp.int32)
      stopped_B = jnp.any(token_B[:, None] == stop_ids_BK, axis=-1)
      if with_strings:
        string_state_BS = stop_table_SQV[jnp.arange(S)[None, :], string_state_BS, token_B[:, None]]
        matched_BS = (string_state_BS == stop_len_S[None, :]) & stop_mask_BS
        stopped_B |= jnp.any(matched_BS, axis=-1)
      new_finish_B = jnp.where(stopped_B, 1, jnp.where(count_B >= max_new_B, 2, 0))
      finish_B = jnp.where(done_B, finish_B, new_finish_B)
      if seen_BV is not None:
        seen_BV = seen_BV.at[rows_B, token_B].set(True)
      return token_B, logprob_B, seen_BV, string_state_BS, count_B, done_B | (finish_B > 0), finish_B

    zeros_B = jnp.zeros((B,), jnp.int32)
    string_state_BS = jnp.zeros((B, S), jnp.int32)
    token_B, logprob_B, seen_BV, string_state_BS, count_B, done_B, finish_B = choose(
        0, logits_BV, seen_BV, string_state_BS, zeros_B, zeros_B > 0, zeros_B)
    tokens_BN = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(token_B)
    logprobs_BN = jnp.zeros((B, steps), jnp.float32).at[:, 0].set(logprob_B)

    def cond(carry):
      i, done_B = carry[0], carry[6]
      return (i < steps) & ~jnp.all(done_B)

    def body(carry):
      i, cache, token_B, seen_BV, string_state_BS, count_B, done_B, finish_B, tokens_BN, logprobs_BN = carry
      logits_BV, cache = adapter.step(params, token_B, start_B + i - 1, cache)
      token_B, logprob_B, seen_BV, string_state_BS, count_B, done_B, finish_B = choose(
          i, logits_BV, seen_BV, string_state_BS, count_B, done_B, finish_B)
      tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], i, axis=1)
      logprobs_BN = jax.lax.dynamic_update_slice_in_dim(logprobs_BN, logprob_B[:, None], i, axis=1)
      return i + 1, cache, token_B, seen_BV, string_state_BS, count_B, done_B, finish_B, tokens_BN, logprobs_BN

    # The carry's `done` sits at index 6 for `cond`; keep the two tuples in step.
    carry = (jnp.int32(1), cache, token_B, seen_BV, string_state_BS, count_B, done_B, finish_B, tokens_BN,
             logprobs_BN)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[8], carry[9], carry[5], carry[7]

SHORT_BUCKETS = (16, 32)  # padded prompt lengths below 64 (padded_length)


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class Engine:
  """A model and its params on a mesh, ready to decode batches of requests (and beam search).

  `mesh=None` runs unsharded on the default device. `token_bytes` (stops.token_bytes) enables stop strings.
  """

  def __init__(self, model, params, *, eos_id: int, mesh=None, rules=(), token_bytes=None):
    self.model, self.params, self.eos_id = model, params, eos_id
    self.adapter = adapter_for(model)
    self.mesh, self.rules = mesh, rules
    self.vocab = stops.TokenBytes(token_bytes) if token_bytes is not None else None
    self._decode = jax.jit(functools.partial(_decode, self.adapter, mesh, rules),
                           static_argnames=('stages', 'with_strings', 'steps', 'vocab'))

  # -- batch layout ---------------------------------------------------------------------------------------

  def batch_shards(self) -> int:
    """How many ways the mesh splits the batch axis: every batch is padded to a multiple of it."""
    if self.mesh is None:
      return 1
    axes = sharding.logical_to_spec(('batch',), self.rules)[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def padded_rows(self, n: int) -> int:
    return stops.round_up(_pow2(n), self.batch_shards())

  def put(self, array: np.ndarray, names: Sequence[str | None]):
    """A host array onto the mesh by logical names (or onto the default device without a mesh)."""
    if self.mesh is None:
      return jnp.asarray(array)
    return sharding.host_to_global(array, sharding.named_sharding(self.mesh, names, self.rules))

  def padded_length(self, n: int) -> int:
    """The length a batch of rows of up to `n` tokens is padded to: 16 or 32 (short prompts, the common case
    of chats and harnesses, prefill at a quarter or half the cost of 64), else a multiple of 64, so that a few
    compiled programs serve every length; never past the model's position table (models.transformer.
    position_rows), since rows are numbered 0 .. P-1 padding included."""
    limit = position_rows(self.model.cfg)
    if limit is not None and n > limit:
      raise ValueError(f'{n} tokens do not fit the {limit} positions of the model (model.max_positions)')
    P = next((b for b in SHORT_BUCKETS if n <= b), None) or stops.round_up(n, 64)
    return P if limit is None else min(P, limit)

  def prompt_buckets(self, longest: int) -> list[int]:
    """Every padded length of prompts up to `longest` tokens (what a server compiles ahead)."""
    return sorted({self.padded_length(n) for n in range(1, longest + 1)})

  def prompts(self, token_lists: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [rows, P] prompts (P from padded_length) and their lengths; padding rows hold one token."""
    if any(len(t) == 0 for t in token_lists):
      raise ValueError('every prompt needs at least one token')
    P = self.padded_length(max(len(t) for t in token_lists))
    prompt_BP = np.zeros((rows, P), np.int32)
    lengths_B = np.ones(rows, np.int32)
    for b, t in enumerate(token_lists):
      prompt_BP[b, :len(t)] = t
      lengths_B[b] = len(t)
    return prompt_BP, lengths_B

  def stop_ids(self, stop_tokens: Sequence[Sequence[int]], with_eos: Sequence[bool], rows: int) -> np.ndarray:
    """[rows, K] each row's stop ids (EOS where asked) padded with -1, which is never a token; K a power of
    two. Rows past the given ones have none."""
    sets = [sorted(set(t) | ({self.eos_id} if eos else set())) for t, eos in zip(stop_tokens, with_eos)]
    out = np.full((rows, _pow2(max(1, max(len(s) for s in sets)))), -1, np.int32)
    for b, s in enumerate(sets):
      out[b, :len(s)] = s
    return out

  # -- sampling -------------------------------------------------------------------------------------------

  def generate(self, requests: Sequence[Request]) -> list[Result]:
    """Continue every request; the batch runs as one compiled program."""
    if not requests:
      return []
    params_list = [r.sampling for r in requests]
    rows = self.padded_rows(len(requests))
    prompt_BP, lengths_B = self.prompts([r.tokens for r in requests], rows)
    steps = stops.round_up(max(p.max_new_tokens for p in params_list), 32)
    max_new_B = np.ones(rows, np.int32)
    max_new_B[:len(requests)] = [p.max_new_tokens for p in params_list]
    sample_B = np.zeros(rows, np.int32)
    sample_B[:len(requests)] = [r.sample for r in requests]

    stop_ids_BK = self.stop_ids([p.stop_tokens for p in params_list], [not p.ignore_eos for p in params_list],
                                rows)
    with_strings = any(p.stop_strings for p in params_list)
    if with_strings:
      if self.vocab is None:
        raise ValueError('stop strings need the Engine to know the tokens\' bytes (token_bytes=...)')
      table, length, mask = stops.build(self.vocab, [p.stop_strings for p in params_list], rows)
    else:
      table, length, mask = np.zeros((1, 1, 1), np.int32), np.ones(1, np.int32), np.zeros((rows, 1), bool)

    knobs = {k: self.put(v, ('batch',)) for k, v in sampling.knob_arrays(params_list, rows).items()}
    tokens_BN, logprobs_BN, count_B, finish_B = self._decode(
        self.params, self.put(prompt_BP, ('batch', None)), self.put(lengths_B, ('batch',)),
        self.put(max_new_B, ('batch',)), knobs, self.put(sample_B, ('batch',)),
        self.put(stop_ids_BK, ('batch', None)), self.put(table, (None, None, None)),
        self.put(length, (None,)), self.put(mask, ('batch', None)),
        stages=Stages.of(params_list), with_strings=with_strings, steps=steps,
        vocab=self.model.cfg.vocab_size)
    tokens_BN, logprobs_BN, count_B, finish_B = sharding.fetch((tokens_BN, logprobs_BN, count_B, finish_B))
    return [Result(tokens=tokens_BN[b, :count_B[b]].tolist(), logprobs=logprobs_BN[b, :count_B[b]].tolist(),
                   finish_reason=FINISH_REASONS[int(finish_B[b])]) for b in range(len(requests))]

  def generate_one(self, tokens: Sequence[int], params: SamplingParams, sample: int = 0) -> Result:
    """One prompt's continuation: what an interactive chat calls each turn."""
    [result] = self.generate([Request(tuple(tokens), params, sample)])
    return result

  # -- beam search ----------------------------------------------------------------------------------------

  def beam_search(self, token_lists: Sequence[Sequence[int]], params) -> list[list]:
    """The finished beams of each prompt, best first (see beam_search.py for `params`)."""
    from llm_jax.infer import beam_search
    return beam_search.run(self, token_lists, params)
