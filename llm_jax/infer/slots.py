"""Continuous batching: a fixed number of decode slots, each with its own rows of one KV cache, that requests
enter and leave between decode steps (the prefill / insert / generate split of JetStream).

Letters as in decode.py; B slots (padded to what the mesh's batch shards divide), C the context (data.seq_len),
P a prompt's padded length, k the top alternatives returned per token.

  prefill + insert  one compiled program per prompt bucket (P: decode.padded_length): runs the prompt
                    through the model into a one-row cache of length C, writes that row into slot `slot` of
                    the state and chooses the first new token. `slot` is traced: any slot, no recompiling.
  generate          feeds each slot's last token at its own position and chooses each slot's next token,
                    over the first R slots, R the power of two that covers the busy ones (new requests take
                    the lowest free slot): one program per R, so one client does not pay for 32 slots. Free
                    slots among them compute too (fixed shapes) and their output is ignored.

Both are jitted under the run's mesh and logical rules, with the cache constrained to its logical axes, and the state
is donated so the cache is updated in place. Token choice is sampling.next_tokens with each slot's own knobs and
key (the key folded with the slot's step count, as decode.py folds it, so a seeded request draws the same
tokens on both paths), log-probabilities are sampling.logprobs_of (run only when a job in the batch asks for
them); stop tokens, stop strings (stops.Matcher: decode.py's automata stepped on the host) and max_new_tokens
end a request on the host, which reads every step's tokens anyway to stream them. A finished or cancelled
request frees its slot at once; waiting ones enter free slots before the next step. Which sampling stages
run is static (sampling.Stages): a few programs.

One thread owns the device: it also runs the scoring jobs (loglik.score) that `echo` asks for between steps.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.infer import decode, loglik, sampling, stops
from llm_jax.infer.sampling import SamplingParams, Stages
from llm_jax.models import cache_rows_axis

TOP = 5


@dataclass(eq=False)
class Job:
  """One request for one continuation. `on_token(token, logprob, top_ids, top_logprobs)` is called for each new
  token (the last three None unless `logprobs`) and `on_done(finish_reason or None, error or None)` once, both
  on the engine's thread."""
  tokens: list[int]
  params: SamplingParams
  sample: int
  on_token: Callable
  on_done: Callable
  logprobs: bool = False  # the log-probability of each token and the TOP likeliest alternatives
  cancelled: bool = False
  count: int = 0
  matcher: Any = None
  stop_ids: frozenset = field(default_factory=frozenset)

  def cancel(self) -> None:
    self.cancelled = True  # the engine frees its slot before the next step


def _init_state(adapter, mesh, rules, B: int, C: int, V: int):
  with sharding.activation_sharding(mesh, rules):
    knobs = {k: jnp.asarray(v) for k, v in sampling.knob_arrays([], B).items()}
    return {'cache': adapter.init_cache(B, C, 0), 'token': jnp.zeros((B,), jnp.int32),
            'pos': jnp.zeros((B,), jnp.int32), 'count': jnp.zeros((B,), jnp.int32),
            'key': sampling.row_keys(jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)),
            'seen': jnp.zeros((B, V), bool), 'knobs': knobs}


def _choose(logits_BV, key_B, count_B, knobs, seen_BV, stages, logprobs):
  """Each row's next token, and with `logprobs` (some job in the batch asked for them) its log-probability and
  the TOP likeliest alternatives: a log-softmax and a top-k over the vocabulary, an eighth of a 16-row step, so
  a batch that wants none skips them."""
  step_keys_B = jax.vmap(jax.random.fold_in)(key_B, count_B)
  token_B = sampling.next_tokens(logits_BV, step_keys_B, knobs, seen_BV, stages)
  if not logprobs:
    return token_B, (token_B,)
  logprob_B, top_Bk, top_logprob_Bk = sampling.logprobs_of(logits_BV, token_B, TOP)
  return token_B, (token_B, logprob_B, top_Bk, top_logprob_Bk)


def _prefill_insert(adapter, mesh, rules, C, params, state, prompt_1P, length, slot, knobs_1, seed, sample, *,
                    stages, logprobs):
  with sharding.activation_sharding(mesh, rules):
    P = prompt_1P.shape[1]
    one = adapter.init_cache(1, C, 0)
    logits_1V, one, start_1 = adapter.prefill(params, prompt_1P, length[None], one)
    cache = decode.put_cache_rows(state['cache'], one, slot)
    V = state['seen'].shape[1]
    in_prompt_P = jnp.arange(P) < length
    seen_1V = jnp.zeros((1, V), bool).at[0, prompt_1P[0]].max(in_prompt_P)
    key_1 = sampling.row_keys(seed[None], sample[None])
    token_1, out = _choose(logits_1V, key_1, jnp.zeros((1,), jnp.int32), knobs_1, seen_1V, stages, logprobs)
    seen_1V = seen_1V.at[0, token_1[0]].set(True)
    put = lambda a, v: a.at[slot].set(v[0])  # noqa: E731
    state = {'cache': cache, 'token': put(state['token'], token_1), 'pos': put(state['pos'], start_1),
             'count': put(state['count'], jnp.ones((1,), jnp.int32)), 'key': put(state['key'], key_1),
             'seen': put(state['seen'], seen_1V),
             'knobs': {k: put(v, knobs_1[k]) for k, v in state['knobs'].items()}}
    return state, out


def _generate(adapter, mesh, rules, C, params, state, *, stages, logprobs, rows: int):
  """One step of the first `rows` slots (the busy ones are kept low: a free slot is filled lowest first), so a
  lightly loaded server pays for the rows it uses, not for every slot."""
  with sharding.activation_sharding(mesh, rules):
    head = lambda a: a[:rows]  # noqa: E731
    knobs = {k: head(v) for k, v in state['knobs'].items()}
    if rows == 1 < state['token'].shape[0]:
      # One row: XLA turns its one-position cache write into an update-slice, reads the result through a copy
      # of the whole cache per layer, and copying the row out and back in is far cheaper (measured).
      rows_of = lambda a: jax.lax.slice_in_dim(a, 0, 1, axis=cache_rows_axis(a))  # noqa: E731
      logits_RV, cache = adapter.step(params, head(state['token']), head(state['pos']),
                                      jax.tree.map(rows_of, state['cache']))
      cache = decode.put_cache_rows(state['cache'], cache, 0)
    else:
      # The whole cache goes in, and the model writes and reads its first `rows` rows in place
      # (layers.Attention): slicing those rows out of every layer and writing them back was a third of a step.
      logits_RV, cache = adapter.step(params, head(state['token']), head(state['pos']), state['cache'])
    seen_RV = head(state['seen'])
    token_R, out = _choose(logits_RV, head(state['key']), head(state['count']), knobs, seen_RV, stages, logprobs)
    rows_R = jnp.arange(rows)
    put = lambda a, v: a.at[:rows].set(v)  # noqa: E731
    state = {**state, 'cache': cache, 'token': put(state['token'], token_R),
             'pos': put(state['pos'], jnp.minimum(head(state['pos']) + 1, C - 1)),
             'count': put(state['count'], head(state['count']) + 1),
             'seen': put(state['seen'], seen_RV.at[rows_R, token_R].set(True))}
    return state, out


class SlotEngine:
  """`slots` requests decoded together; more wait their turn. `batch_wait_s`: an idle engine waits this long
  after a first request for others to start with it."""

  def __init__(self, engine: decode.Engine, context: int, slots: int = 16, batch_wait_s: float = 0.0):
    if not isinstance(engine.adapter, decode.DecoderOnly):
      raise ValueError('continuous batching is for decoder-only models')
    self.engine, self.context, self.wait = engine, context, batch_wait_s
    self.slots = engine.padded_rows(slots) if slots > 1 else engine.batch_shards()
    self.usable = slots  # padding slots past `slots` stay free
    # The step's width when the highest busy slot is n - 1: a power of two, so a few programs (looked up, as
    # working it out from the mesh at every step showed in the engine thread's profile).
    self._widths = [min(self.slots, engine.padded_rows(max(n, 1))) for n in range(self.slots + 1)]
    statics = (engine.adapter, engine.mesh, engine.rules)
    self._state = jax.jit(functools.partial(_init_state, *statics),
                          static_argnums=(0, 1, 2))(self.slots, context, engine.model.cfg.vocab_size)
    # Both return the state placed exactly as _init_state placed it (and their tokens replicated): left to
    # XLA, a prefill's output placed the key and seen-token rows by an equivalent but different spec, and the
    # next call with that state was a second entry of jit's cache: one more compile per program.
    placed = (jax.tree.map(lambda a: a.sharding, self._state), sharding.replicated(engine.mesh))
    self._prefill = jax.jit(functools.partial(_prefill_insert, *statics, context), out_shardings=placed,
                            static_argnames=('stages', 'logprobs'), donate_argnums=(1,))
    self._generate = jax.jit(functools.partial(_generate, *statics, context), out_shardings=placed,
                             static_argnames=('stages', 'logprobs', 'rows'), donate_argnums=(1,))
    self._active: list[Job | None] = [None] * self.slots
    self._pending = None  # (the outputs of the step started last, the job in each of its slots then)
    self._first: list = []  # (prefill outputs, slot, job) of the jobs inserted since the last step started
    self._waiting: deque = deque()
    self._scoring: deque = deque()  # (sequences, concurrent Future)
    self._lock = threading.Condition()
    self._closed = False
    self.steps = 0  # generate steps run
    self.most_active = 0  # the most slots busy in one step (tests, benchmarks)
    self._thread = threading.Thread(target=self._work, name='llm-jax-slots', daemon=True)
    self._thread.start()

  def warm(self) -> None:
    """Compile ahead what greedy requests use (every prompt bucket's prefill, every step width), so the first
    clients do not wait for compiles. Call before serving: it writes only into free slots. The prefills are
    called with the very argument types a request's are (`_prefill_args`): a device array where a request
    passes a host one is another entry of jit's cache, and the first request of each bucket compiled again."""
    eng, greedy = self.engine, Stages.of([SamplingParams()])
    for P in eng.prompt_buckets(self.context):
      self._state, _ = self._prefill(*self._prefill_args([1] * P, SamplingParams(), 0, 0), stages=greedy,
                                     logprobs=False)
    rows = set(self._widths[1:self.usable + 1])
    for r in sorted(rows):
      self._state, out = self._generate(eng.params, self._state, stages=greedy, logprobs=False, rows=r)
    jax.block_until_ready(self._state)

  # -- what request threads call ----------------------------------------------------------------------------

  def submit(self, job: Job) -> Job:
    with self._lock:
      self._waiting.append(job)
      self._lock.notify()
    return job

  def score(self, sequences):
    from concurrent.futures import Future
    future = Future()
    with self._lock:
      self._scoring.append((sequences, future))
      self._lock.notify()
    return future

  def close(self) -> None:
    with self._lock:
      self._closed = True
      self._lock.notify()
    self._thread.join()

  # -- the device thread --------------------------------------------------------------------------------------

  def _work(self) -> None:
    while True:
      with self._lock:
        while not (self._closed or self._waiting or self._scoring or any(self._active)):
          self._lock.wait()
        if self._closed:
          for job in [j for j in self._active if j] + list(self._waiting):
            job.on_done(None, RuntimeError('the server is shutting down'))
          return
        idle = not any(self._active)
      if idle and self.wait and self._waiting:
        time.sleep(self.wait)  # let requests sent together start together
      try:
        self._run_scoring()
        self._admit()
        if any(self._active):
          self._step()
        else:
          self._pending, self._first = None, []  # started for jobs that have all ended since
      except Exception as e:  # noqa: BLE001 - a device failure fails the requests in flight, not the server
        traceback.print_exc(file=sys.stderr)
        self._pending, self._first = None, []
        for i, job in enumerate(self._active):
          if job is not None:
            self._active[i] = None
            job.on_done(None, e)

  def _run_scoring(self) -> None:
    with self._lock:
      jobs, self._scoring = list(self._scoring), deque()
    for sequences, future in jobs:
      try:
        future.set_result(loglik.score(self.engine, sequences, batch_size=max(1, self.usable)))
      except Exception as e:  # noqa: BLE001 - reported to the waiting request
        future.set_exception(e)

  def _admit(self) -> None:
    while True:
      free = [i for i in range(self.usable) if self._active[i] is None]
      with self._lock:
        if not free or not self._waiting:
          return
        job = self._waiting.popleft()
      if job.cancelled:
        job.on_done(None, None)
        continue
      self._insert(free[0], job)

  def _insert(self, slot: int, job: Job) -> None:
    eng, p = self.engine, job.params
    job.stop_ids = frozenset(p.stop_tokens) | (frozenset() if p.ignore_eos else {eng.eos_id})
    job.matcher = stops.Matcher(eng.vocab, p.stop_strings) if p.stop_strings else None
    self._state, out = self._prefill(*self._prefill_args(job.tokens, p, slot, job.sample), stages=Stages.of([p]),
                                     logprobs=job.logprobs)
    self._active[slot] = job
    self._first.append((out, slot, job))  # handed out with the next step's flush, as that step runs

  def _prefill_args(self, tokens: list[int], p: SamplingParams, slot: int, sample: int) -> tuple:
    """The prefill's arguments. Host arrays go straight into the jitted call, which places them (replicated,
    as they are small): a device put or a jnp scalar per argument cost more host time than the dispatch."""
    prompt_BP, length_B = self.engine.prompts([tokens], 1)
    i32 = np.int32
    return (self.engine.params, self._state, prompt_BP, i32(length_B[0]), i32(slot), sampling.knob_arrays([p], 1),
            i32(p.seed), i32(sample))

  def _step(self) -> None:
    """Start the next decode step, then hand out the tokens of the one before while the device computes it:
    the host's per-token work (reading tokens, stop strings, the requests' callbacks) overlaps the step
    instead of following it. A job that ends on those tokens has its slot computed once more, and that
    output is dropped: `_pending` remembers which job each slot held when its step started."""
    live = [j for j in self._active if j is not None]
    self.most_active = max(self.most_active, len(live))
    last = max(i for i, j in enumerate(self._active) if j is not None)
    rows = self._widths[last + 1]
    self._state, out = self._generate(self.engine.params, self._state,
                                      stages=Stages.of([j.params for j in live]),
                                      logprobs=any(j.logprobs for j in live), rows=rows)
    self.steps += 1
    self._flush()
    self._pending = (out, list(self._active[:rows]))

  def _flush(self) -> None:
    """Hand out the tokens of the step started before the last one, then the first tokens of the jobs
    inserted since (their second comes from the step just started, handed out next time), each to a job
    still in the slot it had then."""
    pending, first = self._pending, self._first
    self._pending, self._first = None, []
    if pending is not None:
      out, jobs = pending
      arrays = sharding.fetch(out)
      for slot, job in enumerate(jobs):
        if job is not None and self._active[slot] is job:
          self._emit(slot, [a[slot] for a in arrays])
    for out, slot, job in first:
      if self._active[slot] is job:
        self._emit(slot, [np.asarray(a)[0] for a in sharding.fetch(out)])

  def _emit(self, slot: int, out) -> None:
    """Hand one new token to its job and end the job if it stops there (decode.py's order: a stop before
    the length limit)."""
    job = self._active[slot]
    token = int(out[0])
    job.count += 1
    if job.logprobs:
      job.on_token(token, float(out[1]), out[2].tolist(), out[3].tolist())
    else:
      job.on_token(token, None, None, None)
    stopped = token in job.stop_ids
    if job.matcher is not None:
      stopped = job.matcher.advance(token) or stopped
    reason = 'stop' if stopped else 'length' if job.count >= job.params.max_new_tokens else None
    if reason is None and job.cancelled:
      reason = 'cancelled'
    if reason is not None:
      self._active[slot] = None
      job.on_done(reason if reason != 'cancelled' else None, None)
