"""Sampling knobs and the choice of the next token from the logits, for a batch whose rows may each ask for
different knobs (a server batches unrelated requests).

Letters: B batch (rows), V vocab. Every knob is a traced [B] array: changing a value never recompiles. Which
stages run at all is static (`Stages`), decided on the host from the rows of the batch, so greedy decoding
pays for no sort and no random numbers.

Order of the stages, as in Hugging Face's `generate`: repetition penalty on the raw logits, then temperature,
then top-k, top-p (nucleus, on the top-k renormalised distribution) and min-p, then a draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.errors import UserError

Array = jax.Array

MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
  """How one request is continued. The defaults are greedy decoding stopped by EOS."""
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p_max (Nguyen et al. 2024)
  repetition_penalty: float = 1.0  # 1: off; CTRL's penalty (Keskar et al. 2019) on seen tokens
  max_new_tokens: int = 64
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()  # besides EOS
  stop_strings: tuple[str, ...] = ()
  ignore_eos: bool = False  # EOS does not stop (benchmarks that need an exact number of tokens)

  def check(self, flag_prefix: str = '--') -> None:
    """A UserError naming the first bad knob (`flag_prefix` names it the way the caller spells it)."""
    def bad(name, value, expected):
      raise UserError(f'{flag_prefix}{name}={value}: expected {expected}')
    if not (self.temperature >= 0 and np.isfinite(self.temperature)):
      bad('temperature', self.temperature, 'a value >= 0 (0 is greedy)')
    if not 0 < self.top_p <= 1:
      bad('top_p', self.top_p, 'a value in (0, 1]')
    if self.top_k < 0:
      bad('top_k', self.top_k, 'a value >= 0 (0 is off)')
    if not 0 <= self.min_p < 1:
      bad('min_p', self.min_p, 'a value in [0, 1) (0 is off)')
    if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
      bad('repetition_penalty', self.repetition_penalty, 'a value > 0 (1 is off)')
    if self.max_new_tokens < 1:
      bad('max_new_tokens', self.max_new_tokens, 'a positive integer')
    if not 0 <= self.seed <= MAX_SEED:
      bad('seed', self.seed, f'an integer in [0, {MAX_SEED}]')
    if any(not s for s in self.stop_strings):
      bad('stop', list(self.stop_strings), 'non-empty strings')


class Stages(NamedTuple):
  """Which sampling stages a batch needs (static: one compiled program per combination in use)."""
  penalty: bool
  sample: bool
  truncate: bool

  @classmethod
  def of(cls, params: Sequence[SamplingParams]) -> 'Stages':
    sample = any(p.temperature > 0 for p in params)
    return cls(penalty=any(p.repetition_penalty != 1.0 for p in params), sample=sample,
               truncate=sample and any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params))


KNOBS = ('temperature', 'top_k', 'top_p', 'min_p', 'repetition_penalty', 'seed')


def knob_arrays(params: Sequence[SamplingParams], rows: int) -> dict[str, np.ndarray]:
  """[rows] arrays of each knob; rows past len(params) (batch padding) are greedy and unpenalised."""
  pad = SamplingParams()
  full = list(params) + [pad] * (rows - len(params))
  out = {}
  for name in KNOBS:
    dtype = np.int32 if name in ('top_k', 'seed') else np.float32
    out[name] = np.array([getattr(p, name) for p in full], dtype)
  return out


def row_keys(seed_B: Array, sample_B: Array) -> Array:
  """One PRNG key per row from its seed and its sample index (num_samples > 1 of one prompt), so a row's
  draws do not depend on which other rows share its batch."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed_B, sample_B)


def penalise(logits_BV: Array, seen_BV: Array, penalty_B: Array) -> Array:
  """Seen tokens become less likely: positive logits are divided by the penalty, negative multiplied."""
  p_B1 = penalty_B[:, None]
  hit_BV = jnp.where(logits_BV > 0, logits_BV / p_B1, logits_BV * p_B1)
  return jnp.where(seen_BV, hit_BV, logits_BV)


def truncate(scaled_BV: Array, top_k_B: Array, top_p_B: Array, min_p_B: Array) -> Array:
  """Mask (to -inf) the tokens that top-k, then nucleus, then min-p remove; the top token always stays."""
  V = scaled_BV.shape[-1]
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  kth_B1 = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
  in_k_BV = sorted_BV >= kth_B1
  # Nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p.
  probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = (mass_before_BV < top_p_B[:, None]) & in_k_BV
  cut_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  # min-p compares probabilities with the top one: p >= min_p * p_max <=> logit >= max + log(min_p).
  floor_B1 = sorted_BV[:, :1] + jnp.log(min_p_B[:, None])
  cut_B1 = jnp.maximum(cut_B1, floor_B1)
  return jnp.where(scaled_BV >= cut_B1, scaled_BV, -jnp.inf)


def first_max(logits_BV: Array) -> Array:
  """jnp.argmax over the last axis (the first index of the largest value), as two plain reductions: XLA's CPU
  backend runs argmax's (value, index) pair reduction element by element, 4x slower than a max and then a min
  over the indices that hold it (tools/bench_serve.py's decode step spent an eighth of its time there). A row
  of NaNs, which argmax would answer with its first NaN, gives the last index here, still a valid token."""
  V = logits_BV.shape[-1]
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  first_B = jnp.min(jnp.where(logits_BV == max_B1, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)
  return first_B.astype(jnp.int32)


def next_tokens(logits_BV: Array, keys_B: Array, knobs: dict[str, Array], seen_BV: Array | None,
                stages: Stages) -> Array:
  """The next token of every row: greedy where temperature is 0, else a draw with the row's own key."""
  logits_BV = logits_BV.astype(jnp.float32)
  if stages.penalty:
    logits_BV = penalise(logits_BV, seen_BV, knobs['repetition_penalty'])
  greedy_B = first_max(logits_BV)
  if not stages.sample:
    return greedy_B
  temperature_B = knobs['temperature']
  scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
  if stages.truncate:
    scaled_BV = truncate(scaled_BV, knobs['top_k'], knobs['top_p'], knobs['min_p'])
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def logprobs_of(logits_BV: Array, token_B: Array, top: int = 0):
  """log p(token) of each row under the model (the raw logits: before penalty, temperature, truncation), and
  with `top` > 0 the `top` likeliest tokens' ids and log-probabilities too (one log-softmax for both, so a
  chosen top token has exactly the top log-probability). The one log-probability code of every decoder."""
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
  if not top:
    return logprob_B
  top_logprob_Bk, top_Bk = jax.lax.top_k(logp_BV, top)
  return logprob_B, top_Bk.astype(jnp.int32), top_logprob_Bk


def sample_logits(logits_BV: Array, rng: Array, temperature, top_k, top_p, min_p=0.0) -> Array:
  """One set of knobs for every row (tests and one-off use); `rng` is split into one key per row."""
  B = logits_BV.shape[0]
  knobs = {name: jnp.full((B,), value) for name, value in
           (('temperature', temperature), ('top_k', top_k), ('top_p', top_p), ('min_p', min_p))}
  stages = Stages(penalty=False, sample=True, truncate=True)
  return next_tokens(logits_BV, jax.random.split(rng, B), knobs, None, stages)
