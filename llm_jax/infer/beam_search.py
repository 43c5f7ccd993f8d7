"""Beam search with a length penalty, in one compiled program driven by the same model adapter as sampling.

Letters: R prompts (rows, padded), W beams per prompt, V vocab, N new tokens; `RW` is R * W flattened.

Each step extends every alive beam by every token, keeps the 2W best candidates per prompt, moves those
that end in a stop token to the finished set (scored with GNMT's length penalty, Wu et al. 2016:
logprob / ((5 + length) / 6) ** alpha) and keeps the W best others alive. The KV cache rows follow their
parent beams (`adapter.reorder`). A prompt is done when its finished set is full and no alive beam can still
beat its worst finished beam; at the end, beams still alive count as finished by length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.errors import UserError

Array = jax.Array
NEG = -1e30  # "no beam": finite, so sums and divisions stay well defined


@dataclass(frozen=True)
class BeamParams:
  num_beams: int = 4
  length_penalty: float = 1.0  # alpha; 0 scores by total log-probability, larger favours longer beams
  max_new_tokens: int = 64
  stop_tokens: tuple[int, ...] = ()  # besides EOS

  def check(self, flag_prefix: str = '--') -> None:
    if self.num_beams < 1:
      raise UserError(f'{flag_prefix}num_beams={self.num_beams}: expected a positive integer')
    if self.max_new_tokens < 1:
      raise UserError(f'{flag_prefix}max_new_tokens={self.max_new_tokens}: expected a positive integer')
    if not np.isfinite(self.length_penalty):
      raise UserError(f'{flag_prefix}length_penalty={self.length_penalty}: expected a finite number')


@dataclass
class Beam:
  tokens: list[int]
  logprob: float  # sum of the tokens' log-probabilities
  score: float  # logprob / length penalty: what beams are ranked by
  finish_reason: str  # 'stop' or 'length'


def _penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _search(adapter, mesh, rules, params, prompt_RP, lengths_R, live_R, stop_ids_K, alpha, *, beams: int,
            steps: int):
  with sharding.activation_sharding(mesh, rules):
    R, P = prompt_RP.shape
    W, N = beams, steps
    cache = adapter.init_cache(R, P, N)
    logits_RV, cache, start_R = adapter.prefill(params, prompt_RP, lengths_R, cache)
    V = logits_RV.shape[-1]
    cache = adapter.reorder(cache, jnp.repeat(jnp.arange(R), W))
    start_RW = jnp.repeat(start_R, W)
    prompt_base_R = jnp.arange(R) * W

    def expand(i, logits_RWV, alive):
      seq_RWN, logp_RW, fin_seq_RWN, fin_score_RW, fin_logp_RW, fin_len_RW = alive
      cand_RWV = logp_RW[:, :, None] + jax.nn.log_softmax(logits_RWV.astype(jnp.float32), axis=-1)
      top_score_RC, top_idx_RC = jax.lax.top_k(cand_RWV.reshape(R, W * V), 2 * W)
      parent_RC, token_RC = top_idx_RC // V, (top_idx_RC % V).astype(jnp.int32)
      seq_RCN = jnp.take_along_axis(seq_RWN, parent_RC[:, :, None], axis=1)
      seq_RCN = jnp.where((jnp.arange(N) == i)[None, None, :], token_RC[:, :, None], seq_RCN)
      stop_RC = jnp.any(token_RC[:, :, None] == stop_ids_K[None, None, :], axis=-1) & (top_score_RC > NEG / 2)
      # Finished: merge the stopping candidates into the finished set, keep the W best.
      norm_RC = jnp.where(stop_RC, top_score_RC / _penalty(i + 1.0, alpha), NEG)
      all_score = jnp.concatenate([fin_score_RW, norm_RC], axis=1)
      all_logp = jnp.concatenate([fin_logp_RW, top_score_RC], axis=1)
      all_len = jnp.concatenate([fin_len_RW, jnp.full_like(token_RC, i + 1)], axis=1)
      all_seq = jnp.concatenate([fin_seq_RWN, seq_RCN], axis=1)
      fin_score_RW, keep_RW = jax.lax.top_k(all_score, W)
      fin_logp_RW = jnp.take_along_axis(all_logp, keep_RW, axis=1)
      fin_len_RW = jnp.take_along_axis(all_len, keep_RW, axis=1)
      fin_seq_RWN = jnp.take_along_axis(all_seq, keep_RW[:, :, None], axis=1)
      # Alive: the W best candidates that did not stop.
      alive_score_RC = jnp.where(stop_RC, NEG, top_score_RC)
      logp_RW, pick_RW = jax.lax.top_k(alive_score_RC, W)
      seq_RWN = jnp.take_along_axis(seq_RCN, pick_RW[:, :, None], axis=1)
      token_RW = jnp.take_along_axis(token_RC, pick_RW, axis=1)
      parent_RW = jnp.take_along_axis(parent_RC, pick_RW, axis=1)
      return (seq_RWN, logp_RW, fin_seq_RWN, fin_score_RW, fin_logp_RW, fin_len_RW), token_RW, parent_RW

    def finished(i, state):
      logp_RW, fin_score_RW = state[1], state[3]
      best_alive_R = logp_RW.max(axis=1)
      # The best an alive beam can still reach: its log-probability only falls, its penalty moves with
      # its length between now and the last step.
      bound_R = jnp.maximum(best_alive_R / _penalty(i + 1.0, alpha), best_alive_R / _penalty(float(N), alpha))
      worst_R = fin_score_RW.min(axis=1)
      return jnp.all(((worst_R > NEG / 2) & (bound_R <= worst_R)) | ~live_R)

    state = (jnp.zeros((R, W, N), jnp.int32), jnp.full((R, W), NEG).at[:, 0].set(0.0),
             jnp.zeros((R, W, N), jnp.int32), jnp.full((R, W), NEG), jnp.full((R, W), NEG),
             jnp.zeros((R, W), jnp.int32))
    logits_RWV = jnp.broadcast_to(logits_RV[:, None], (R, W, V))
    state, token_RW, parent_RW = expand(0, logits_RWV, state)

    def cond(carry):
      i, state = carry[0], carry[1]
      return (i < N) & ~finished(i - 1, state)

    def body(carry):
      i, state, token_RW, parent_RW, cache = carry
      cache = adapter.reorder(cache, (prompt_base_R[:, None] + parent_RW).reshape(R * W))
      logits_RWV, cache = adapter.step(params, token_RW.reshape(R * W), start_RW + i - 1, cache)
      state, token_RW, parent_RW = expand(i, logits_RWV.reshape(R, W, V), state)
      return i + 1, state, token_RW, parent_RW, cache

    i, state, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, token_RW, parent_RW, cache))
    seq_RWN, logp_RW, fin_seq_RWN, fin_score_RW, fin_logp_RW, fin_len_RW = state
    return seq_RWN, logp_RW, i, fin_seq_RWN, fin_score_RW, fin_logp_RW, fin_len_RW


@functools.lru_cache(maxsize=16)
def _compiled(adapter, mesh, rules):
  return jax.jit(functools.partial(_search, adapter, mesh, rules), static_argnames=('beams', 'steps'))


def run(engine, token_lists: Sequence[Sequence[int]], params: BeamParams) -> list[list[Beam]]:
  """The beams of each prompt, finished ones and (at the length limit) alive ones, best score first."""
  n = len(token_lists)
  rows = engine.padded_rows(n)
  prompt_RP, lengths_R = engine.prompts(token_lists, rows)
  stop_ids_K = engine.stop_ids([params.stop_tokens], [True], 1)[0]
  search = _compiled(engine.adapter, engine.mesh, engine.rules)
  live_R = np.arange(rows) < n  # padding rows never hold the loop open
  out = search(engine.params, engine.put(prompt_RP, ('batch', None)), engine.put(lengths_R, ('batch',)),
               engine.put(live_R, ('batch',)),
               engine.put(stop_ids_K, (None,)), jnp.float32(params.length_penalty),
               beams=params.num_beams, steps=params.max_new_tokens)
  seq, logp, steps_run, fin_seq, fin_score, fin_logp, fin_len = sharding.fetch(out)
  steps_run = int(steps_run)
  results = []
  for r in range(n):
    beams = [Beam(fin_seq[r, w, :fin_len[r, w]].tolist(), float(fin_logp[r, w]), float(fin_score[r, w]), 'stop')
             for w in range(params.num_beams) if fin_score[r, w] > NEG / 2]
    if steps_run == params.max_new_tokens:  # alive beams reached the length limit: they finish by length
      lp = _penalty(float(steps_run), params.length_penalty)
      beams += [Beam(seq[r, w, :steps_run].tolist(), float(logp[r, w]), float(logp[r, w] / lp), 'length')
                for w in range(params.num_beams) if logp[r, w] > NEG / 2]
    beams.sort(key=lambda b: -b.score)
    results.append(beams[:params.num_beams])
  return results
