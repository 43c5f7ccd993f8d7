"""Log-likelihood of given tokens under the model: what multiple-choice tasks rank choices by and what the
server returns for `echo` + `logprobs` (how evaluation harnesses score text through an OpenAI-style API).

Letters: B rows, T tokens (inputs: the sequence without its last token). Rows are laid out like decode
batches (Engine.padded_rows / Engine.put), so any number of sequences runs on any mesh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.models.outputs import forward


@dataclass
class Scores:
  logprobs: list[float]  # log p(token t | tokens before it), for t = 1 .. len - 1
  top_tokens: list[list[int]]  # the TOP most likely tokens at each of those places, most likely first
  top_logprobs: list[list[float]]


TOP = 5  # the most alternatives the OpenAI API's `logprobs` asks for


def _score(model, mesh, rules, params, tokens_BT, positions_BT):
  with sharding.activation_sharding(mesh, rules):
    batch = {'inputs': tokens_BT[:, :-1], 'positions': positions_BT[:, :-1],
             'segment_ids': jnp.ones_like(tokens_BT[:, :-1])}
    logits_BTV = forward(model, params, batch).astype(jnp.float32)
    # One log-softmax for the chosen and the top tokens, so a chosen token that is the top one has exactly
    # the top log-probability (harnesses test greediness by equality).
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    logprob_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    top_logprob_BTk, top_BTk = jax.lax.top_k(logp_BTV, TOP)
    return logprob_BT, top_BTk.astype(jnp.int32), top_logprob_BTk


@functools.lru_cache(maxsize=16)
def _compiled(model, mesh, rules):
  return jax.jit(functools.partial(_score, model, mesh, rules))


def score(engine, sequences: Sequence[Sequence[int]], batch_size: int = 32, progress=None) -> list[Scores]:
  """Per-token scores of each sequence (at least 2 tokens), `batch_size` sequences per compiled batch;
  `progress(n)` is called after each batch with the number of sequences it held."""
  if any(len(s) < 2 for s in sequences):
    raise ValueError('scoring needs sequences of at least two tokens')
  fn = _compiled(engine.model, engine.mesh, engine.rules)
  # Longest first, so batches hold similar lengths and pad little; results go back in the given order.
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
  by_index = {}
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    rows = engine.padded_rows(len(chunk))
    T = engine.padded_length(max(len(sequences[i]) for i in chunk) - 1) + 1  # T - 1 inputs
    tokens_BT = np.zeros((rows, T), np.int32)
    for b, i in enumerate(chunk):
      tokens_BT[b, :len(sequences[i])] = sequences[i]
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T))
    logprob_BT, top_BT, top_logprob_BT = sharding.fetch(fn(
        engine.params, engine.put(tokens_BT, ('batch', None)), engine.put(positions_BT, ('batch', None))))
    for b, i in enumerate(chunk):
      n = len(sequences[i]) - 1
      by_index[i] = Scores(logprob_BT[b, :n].tolist(), top_BT[b, :n].tolist(), top_logprob_BT[b, :n].tolist())
    if progress is not None:
      progress(len(chunk))
  return [by_index[i] for i in range(len(sequences))]
