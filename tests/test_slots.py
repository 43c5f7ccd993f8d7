"""Continuous batching (infer/slots.py) decodes what the offline engine decodes: the same tokens for greedy and
seeded sampling, with stop tokens, stop strings and penalties, while requests enter and leave the slots; the
log-probabilities of the jobs that ask for them."""

import threading
import time

import jax
import numpy as np
import pytest

from llm_jax.infer import inference, slots
from llm_jax.infer.sampling import SamplingParams as SP
from random_run import make_run


@pytest.fixture(scope='module', params=['scanned', 'unrolled', 'one device'])
def run(request, tokenizer_path):
  # Unrolled layers each read and write a cache of their own (transformer.init_layer_caches). On 8 devices the
  # batch is split 8 ways and the cache never has fewer than 8 rows; on one it grows and shrinks by powers of 2.
  if request.param == 'one device':
    return make_run(tokenizer_path, ('model.scan_layers', 'false'), ('mesh.data', '1'), devices=jax.devices()[:1])
  return make_run(tokenizer_path, ('model.scan_layers', str(request.param == 'scanned')))


@pytest.mark.parametrize('num_slots', [2, 5])
def test_slots_equal_the_offline_engine_while_requests_come_and_go(run, num_slots, monkeypatch):
  """With 2 slots four requests wait for a free one; with 5 (padded to 8) the cache grows to 8 rows as they
  enter, with idle rows the model leaves alone, and halves under the requests still running (after 2 steps
  here) as others leave: rows copied to a new cache decode on as they would have."""
  monkeypatch.setattr(slots, 'SHRINK_AFTER', 2)
  prompts = ['import os\n', 'def f(x):', 'class A:', 'x = 1', 'for i in range(3):', 'print(']
  params = [SP(max_new_tokens=9), SP(max_new_tokens=3), SP(max_new_tokens=14, temperature=0.9, seed=5),
            SP(max_new_tokens=6, top_k=5, temperature=1.2, seed=2), SP(max_new_tokens=11, repetition_penalty=1.5),
            SP(max_new_tokens=7, stop_strings=('e',))]
  ids = [inference.prompt_tokens(run, p, 16) for p in prompts]
  want = run.complete(ids, params, [0, 0, 1, 0, 0, 0])
  engine = slots.SlotEngine(run.engine, run.context_len, slots=num_slots)
  try:
    got = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    done = threading.Semaphore(0)

    def on_token(i, token, logprob, top, top_logprob):
      got[i].append(token)
      logprobs[i].append((logprob, top, top_logprob))
    for i, (p, sp) in enumerate(zip(ids, params)):
      # Every other job asks for log-probabilities: batches with and without them, and mixed ones.
      engine.submit(slots.Job(p, sp, 1 if i == 2 else 0, on_token=lambda *a, i=i: on_token(i, *a),
                              on_done=lambda r, e, i=i: (reasons.__setitem__(i, (r, e)), done.release()),
                              logprobs=i % 2 == 0))
    for _ in prompts:
      assert done.acquire(timeout=300)
    assert engine.most_active == min(num_slots, len(prompts))
    fewest = engine.engine.batch_shards()
    if num_slots == 5 and fewest == 1:
      assert engine.resizes >= 4  # 1 -> 2 -> 4 -> 8 rows, then down while some still run
    for _ in range(100):  # the last job's slot is freed just before the engine finds itself idle
      if engine.width == fewest:
        break
      time.sleep(0.05)
    assert engine.width == fewest  # idle: the fewest rows, for whoever comes next
    for i, w in enumerate(want):
      assert got[i] == w.tokens, i
      assert reasons[i] == (w.finish_reason, None), i
      if i % 2:
        assert all(x == (None, None, None) for x in logprobs[i]), i
        continue
      lps, tops, top_lps = zip(*logprobs[i])
      np.testing.assert_allclose(lps, w.logprobs, atol=1e-4, err_msg=str(i))
      for token, lp, top, top_lp in zip(got[i], lps, tops, top_lps):
        assert len(top) == slots.TOP and list(top_lp) == sorted(top_lp, reverse=True)
        assert lp <= top_lp[0] + 1e-6 and (token not in top or abs(top_lp[top.index(token)] - lp) < 1e-6)
  finally:
    engine.close()


def test_warm_compiles_everything_a_greedy_request_runs(run):
  """After warm(), greedy requests of every prompt bucket, alone and together, compile nothing more: the
  prefills are warmed with the argument types a request passes (a device array where a request passes a
  host one is a second entry of jit's cache, and each bucket's first request compiled for 0.6 s)."""
  engine = slots.SlotEngine(run.engine, run.context_len, slots=4)
  programs = lambda: [f._cache_size() for f in (engine._prefill, engine._put_row, engine._resize, engine._generate)]  # noqa: E731
  try:
    engine.warm()
    compiled = programs()
    done = threading.Semaphore(0)
    lengths = [1, 2, 9, 17, 33, run.context_len - 4]
    for n in lengths:
      engine.submit(slots.Job([5] * n, SP(max_new_tokens=3), 0, on_token=lambda *a: None,
                              on_done=lambda r, e: done.release()))
    for _ in lengths:
      assert done.acquire(timeout=300)
    assert engine.most_active > 1
    assert programs() == compiled
  finally:
    engine.close()
