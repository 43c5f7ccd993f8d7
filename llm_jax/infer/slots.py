"""Continuous batching: a fixed number of decode slots, each with its own rows of one KV cache, that requests
enter and leave between decode steps (the prefill / insert / generate split of JetStream).

Letters as in decode.py; B slots (padded to what the mesh's batch shards divide), C the context (data.seq_len),
P a prompt's padded length, k the top alternatives returned per token, W the cache's rows now.

  prefill   one compiled program per prompt bucket (P: decode.padded_length): runs the prompt through the
            model into a one-row cache of length C, chooses the first new token and sets slot `slot`'s
            token, position, key and knobs. `slot` is traced: any slot, no recompiling.
  insert    writes that one-row cache into row `slot` of the cache, in place (one program per W).
  generate  feeds each of the first W slots its last token at its own position and chooses its next token.

The cache holds W rows, W the power of two that covers the busy slots (new requests take the lowest free slot),
not one row per slot: a step computes exactly the cache's rows, so one client does not pay for 32 slots, and
no step reads its rows through a copy (slicing the first rows out of a larger cache did so, a third of a
16-row step on the CPU). W doubles before a request enters a slot past it and halves once the busy slots have
fitted in half of it for SHRINK_AFTER steps (at once when all are free): programs per W, a few of them.

All are jitted under the run's mesh and logical rules, with the cache constrained to its logical axes, and
the state is donated so the cache is updated in place. Token choice is sampling.next_tokens with each slot's
own knobs and key (the key folded with the slot's step count, as decode.py folds it, so a seeded request draws
the same tokens on both paths), log-probabilities are sampling.logprobs_of (run only when a job in the batch
asks for them); stop tokens, stop strings (stops.Matcher: decode.py's automata stepped on the host) and
max_new_tokens end a request on the host, which reads every step's tokens anyway to stream them. A finished or
cancelled request frees its slot at once; waiting ones enter free slots before the next step. Which sampling
stages run is static (sampling.Stages): a few programs.

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
SHRINK_AFTER = 32  # steps the busy slots fit in half the cache before it halves (no copying back and forth)


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


def _init_state(adapter, mesh, rules, B: int, W: int, C: int, V: int):
  """The cache of W rows, and each of the B slots' token, position, step count, key, seen tokens and knobs."""
  with sharding.activation_sharding(mesh, rules):
    knobs = {k: jnp.asarray(v) for k, v in sampling.knob_arrays([], B).items()}
    return adapter.init_cache(W, C, 0), {
        'token': jnp.zeros((B,), jnp.int32), 'pos': jnp.zeros((B,), jnp.int32), 'count': jnp.zeros((B,), jnp.int32),
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


def _prefill(adapter, mesh, rules, C, params, slots, prompt_1P, length, slot, knobs_1, seed, sample, *, stages,
             logprobs):
  """The prompt into a one-row cache (returned for _put_row), its first new token chosen, and slot `slot` set."""
  with sharding.activation_sharding(mesh, rules):
    P = prompt_1P.shape[1]
    one = adapter.init_cache(1, C, 0)
    logits_1V, one, start_1 = adapter.prefill(params, prompt_1P, length[None], one)
    V = slots['seen'].shape[1]
    in_prompt_P = jnp.arange(P) < length
    seen_1V = jnp.zeros((1, V), bool).at[0, prompt_1P[0]].max(in_prompt_P)
    key_1 = sampling.row_keys(seed[None], sample[None])
    token_1, out = _choose(logits_1V, key_1, jnp.zeros((1,), jnp.int32), knobs_1, seen_1V, stages, logprobs)
    seen_1V = seen_1V.at[0, token_1[0]].set(True)
    put = lambda a, v: a.at[slot].set(v[0])  # noqa: E731
    slots = {'token': put(slots['token'], token_1), 'pos': put(slots['pos'], start_1),
             'count': put(slots['count'], jnp.ones((1,), jnp.int32)), 'key': put(slots['key'], key_1),
             'seen': put(slots['seen'], seen_1V), 'knobs': {k: put(v, knobs_1[k]) for k, v in slots['knobs'].items()}}
    return slots, one, out


def _put_row(mesh, rules, cache, one, slot):
  with sharding.activation_sharding(mesh, rules):
    return decode.put_cache_rows(cache, one, slot)


def _resize(mesh, rules, cache, *, rows: int):
  """The cache with `rows` rows: its first rows, or all of them and empty ones after."""
  with sharding.activation_sharding(mesh, rules):
    def one(a):
      axis = cache_rows_axis(a)
      if rows <= a.shape[axis]:
        return jax.lax.slice_in_dim(a, 0, rows, axis=axis)
      pad = [(0, 0)] * a.ndim
      pad[axis] = (0, rows - a.shape[axis])
      return jnp.pad(a, pad)
    return decode.constrain_cache(jax.tree.map(one, cache))


def _generate(adapter, mesh, rules, C, params, cache, slots, *, stages, logprobs):
  """One step of the first W slots, W the cache's rows."""
  with sharding.activation_sharding(mesh, rules):
    W = decode.cache_rows_count(cache)
    head = lambda a: a[:W]  # noqa: E731
    knobs = {k: head(v) for k, v in slots['knobs'].items()}
    logits_WV, cache = adapter.step(params, head(slots['token']), head(slots['pos']), cache)
    seen_WV = head(slots['seen'])
    token_W, out = _choose(logits_WV, head(slots['key']), head(slots['count']), knobs, seen_WV, stages, logprobs)
    put = lambda a, v: a.at[:W].set(v)  # noqa: E731
    slots = {**slots, 'token': put(slots['token'], token_W),
             'pos': put(slots['pos'], jnp.minimum(head(slots['pos']) + 1, C - 1)),
             'count': put(slots['count'], head(slots['count']) + 1),
             'seen': put(slots['seen'], seen_WV.at[jnp.arange(W), token_W].set(True))}
    return cache, slots, out


class SlotEngine:
  """`slots` requests decoded together; more wait their turn. `batch_wait_s`: an idle engine waits this long
  after a first request for others to start with it."""

  def __init__(self, engine: decode.Engine, context: int, slots: int = 16, batch_wait_s: float = 0.0):
    if not isinstance(engine.adapter, decode.DecoderOnly):
      raise ValueError('continuous batching is for decoder-only models')
    self.engine, self.context, self.wait = engine, context, batch_wait_s
    self.slots = engine.padded_rows(slots) if slots > 1 else engine.batch_shards()
    self.usable = slots  # padding slots past `slots` stay free
    # The cache's rows when the highest busy slot is n - 1: a power of two, so a few programs (looked up, as
    # working it out from the mesh at every step showed in the engine thread's profile).
    self._widths = [min(self.slots, engine.padded_rows(max(n, 1))) for n in range(self.slots + 1)]
    self._sizes = sorted(set(self._widths[1:self.usable + 1]))  # every width the cache takes, doubling
    statics = (engine.adapter, engine.mesh, engine.rules)
    self._cache, self._slots = jax.jit(functools.partial(_init_state, *statics), static_argnums=(0, 1, 2, 3))(
        self.slots, self._sizes[0], context, engine.model.cfg.vocab_size)
    # Every program returns the state placed exactly as _init_state placed it (and its tokens replicated): left
    # to XLA, a prefill's output placed the key and seen-token rows by an equivalent but different spec, and
    # the next call with that state was a second entry of jit's cache: one more compile per program.
    cache_at = jax.tree.map(lambda a: a.sharding, self._cache)  # whatever the rows: a NamedSharding
    slots_at, tokens_at = jax.tree.map(lambda a: a.sharding, self._slots), sharding.replicated(engine.mesh)
    # The one-row cache a prefill hands to _put_row is replicated: one row cannot be split over batch shards.
    self._prefill = jax.jit(functools.partial(_prefill, *statics, context), out_shardings=(slots_at, tokens_at,
                                                                                          tokens_at),
                            static_argnames=('stages', 'logprobs'), donate_argnums=(1,))
    self._put_row = jax.jit(functools.partial(_put_row, engine.mesh, engine.rules), out_shardings=cache_at,
                            donate_argnums=(0,))
    # Not donated: a cache of other rows cannot reuse its buffers.
    self._resize = jax.jit(functools.partial(_resize, engine.mesh, engine.rules), out_shardings=cache_at,
                           static_argnames=('rows',))
    self._generate = jax.jit(functools.partial(_generate, *statics, context),
                             out_shardings=(cache_at, slots_at, tokens_at), static_argnames=('stages', 'logprobs'),
                             donate_argnums=(1, 2))
    self._active: list[Job | None] = [None] * self.slots
    self._pending = None  # (the outputs of the step started last, the job in each of its slots then)
    self._first: list = []  # (prefill outputs, slot, job) of the jobs inserted since the last step started
    self._waiting: deque = deque()
    self._scoring: deque = deque()  # (sequences, concurrent Future)
    self._lock = threading.Condition()
    self._closed = False
    self._roomy = 0  # steps in a row whose busy slots fitted in half the cache
    self.steps = 0  # generate steps run
    self.most_active = 0  # the most slots busy in one step (tests, benchmarks)
    self.resizes = 0  # times the cache doubled or halved (tests)
    self._thread = threading.Thread(target=self._work, name='llm-jax-slots', daemon=True)
    self._thread.start()

  @property
  def width(self) -> int:
    """The cache's rows now: what a step computes."""
    return decode.cache_rows_count(self._cache)

  def warm(self) -> None:
    """Compile ahead what greedy requests use (every prompt bucket's prefill; at every cache width the insert,
    the step and the resizes to the next), so the first clients do not wait for compiles. Call before serving:
    it writes only into free slots. The prefills are called with the very argument types a request's are
    (`_prefill_args`): a device array where a request passes a host one is another entry of jit's cache, and
    the first request of each bucket compiled again."""
    eng, greedy = self.engine, Stages.of([SamplingParams()])
    for P in eng.prompt_buckets(self.context):
      self._slots, one, _ = self._prefill(*self._prefill_args([1] * P, SamplingParams(), 0, 0), stages=greedy,
                                          logprobs=False)
    for W in self._sizes:
      self._resize_to(W)
      self._cache = self._put_row(self._cache, one, np.int32(0))
      self._cache, self._slots, _ = self._generate(eng.params, self._cache, self._slots, stages=greedy,
                                                   logprobs=False)
    for W in reversed(self._sizes[:-1]):
      self._resize_to(W)
    jax.block_until_ready((self._cache, self._slots))

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
    self._resize_to(max(self.width, self._widths[slot + 1]))
    self._slots, one, out = self._prefill(*self._prefill_args(job.tokens, p, slot, job.sample),
                                          stages=Stages.of([p]), logprobs=job.logprobs)
    self._cache = self._put_row(self._cache, one, np.int32(slot))
    self._active[slot] = job
    self._first.append((out, slot, job))  # handed out with the next step's flush, as that step runs

  def _resize_to(self, rows: int) -> None:
    """Double or halve the cache until it has `rows` rows (each of those a program warm() compiled)."""
    while self.width != rows:
      i = self._sizes.index(self.width)
      self._cache = self._resize(self._cache, rows=self._sizes[i + 1 if rows > self.width else i - 1])
      self.resizes += 1

  def _prefill_args(self, tokens: list[int], p: SamplingParams, slot: int, sample: int) -> tuple:
    """The prefill's arguments. Host arrays go straight into the jitted call, which places them (replicated,
    as they are small): a device put or a jnp scalar per argument cost more host time than the dispatch."""
    prompt_BP, length_B = self.engine.prompts([tokens], 1)
    i32 = np.int32
    return (self.engine.params, self._slots, prompt_BP, i32(length_B[0]), i32(slot), sampling.knob_arrays([p], 1),
            i32(p.seed), i32(sample))

  def _step(self) -> None:
    """Start the next decode step, then hand out the tokens of the one before while the device computes it:
    the host's per-token work (reading tokens, stop strings, the requests' callbacks) overlaps the step
    instead of following it. A job that ends on those tokens has its slot computed once more, and that
    output is dropped: `_pending` remembers which job each slot held when its step started."""
    live = [j for j in self._active if j is not None]
    self.most_active = max(self.most_active, len(live))
    W = self.width
    self._cache, self._slots, out = self._generate(self.engine.params, self._cache, self._slots,
                                                   stages=Stages.of([j.params for j in live]),
                                                   logprobs=any(j.logprobs for j in live))
    self.steps += 1
    self._flush()
    self._pending = (out, list(self._active[:W]))
    self._fit()

  def _fit(self) -> None:
    """Halve the cache once the busy slots have fitted in half of it for SHRINK_AFTER steps in a row, or down to
    the fewest rows when every slot is free: a step's cost follows its rows."""
    busy = [i for i, j in enumerate(self._active) if j is not None]
    need = self._widths[busy[-1] + 1] if busy else self._sizes[0]
    self._roomy = self._roomy + 1 if need < self.width else 0
    if not busy or self._roomy >= SHRINK_AFTER:
      self._resize_to(need)
      self._roomy = 0

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
