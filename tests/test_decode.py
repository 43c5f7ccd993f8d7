"""Properties of decoding: the compiled loop equals the model run step by step, batching and sharding change
no row's tokens, the sampling knobs do what they say, stops end rows exactly, beam search is exact where it
can be checked by brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config

from llm_jax import sharding
from llm_jax.infer import decode, sampling, stops
from llm_jax.infer.beam_search import BeamParams
from llm_jax.infer.decode import Request, SamplingParams as SP
from llm_jax.models import build_model
from llm_jax.train.state import init_params

PROMPTS = [(1, 17, 99, 250, 31), (1, 400, 12), (1, 5, 6, 7, 8, 9, 10, 11)]


@functools.lru_cache(maxsize=None)
def _model():
  cfg = tiny_config()
  model = build_model(cfg.model)
  return cfg, model, init_params(model, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _engine(sharded: bool = False, eos_id: int = -1):
  cfg, model, params = _model()
  if not sharded:
    return decode.Engine(model, params, eos_id=eos_id)
  mesh = sharding.make_mesh(tiny_config(('mesh.data', '4'), ('mesh.tensor', '2')).mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  shardings = jax.tree.map(lambda a: a.sharding, _sharded_params(model, params, mesh, rules))
  return decode.Engine(model, jax.device_put(params, shardings), eos_id=eos_id, mesh=mesh, rules=rules)


def _sharded_params(model, params, mesh, rules):
  from llm_jax.train.state import param_shardings
  return jax.device_put(params, param_shardings(model, mesh, rules))


@jax.jit
def _padded_logits(params, tokens_1T):
  _, model, _ = _model()
  positions = jnp.arange(tokens_1T.shape[1], dtype=jnp.int32)[None]
  return model.apply({'params': params}, tokens_1T, positions, jnp.ones_like(tokens_1T))[0][0]


def _full_logits(tokens, pad_to=32):
  """The full forward pass without a cache; padding after the tokens cannot change their logits (the model
  is causal, tests/test_model.py), and one padded shape compiles once."""
  arr = np.zeros((1, pad_to), np.int32)
  arr[0, :len(tokens)] = tokens
  return _padded_logits(_model()[2], jnp.asarray(arr))[:len(tokens)]


def _greedy_by_full_forward(prompt, n):
  tokens, logprobs = list(prompt), []
  for _ in range(n):
    logits = _full_logits(tokens)[-1]
    tokens.append(int(jnp.argmax(logits)))
    logprobs.append(float(jax.nn.log_softmax(logits)[tokens[-1]]))
  return tokens[len(prompt):], logprobs


def test_greedy_decode_equals_repeated_full_forward_with_its_logprobs():
  got = _engine().generate([Request(p, SP(max_new_tokens=10)) for p in PROMPTS[:2]])
  for prompt, result in zip(PROMPTS, got):
    tokens, logprobs = _greedy_by_full_forward(prompt, 10)
    assert result.tokens == tokens and result.finish_reason == 'length'
    np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-4)


MIXED = [SP(max_new_tokens=9), SP(temperature=0.9, top_p=0.8, seed=5, max_new_tokens=7),
         SP(temperature=1.2, top_k=20, min_p=0.02, repetition_penalty=1.3, seed=2, max_new_tokens=9)]


def test_batched_and_sharded_generation_equals_one_request_at_a_time():
  requests = [Request(p, s) for p, s in zip(PROMPTS, MIXED)]
  batched = _engine(sharded=True).generate(requests)  # 3 rows padded to the 4 batch shards
  alone = [_engine().generate([r])[0] for r in requests]
  assert [r.tokens for r in batched] == [r.tokens for r in alone]
  assert [len(r.tokens) for r in batched] == [9, 7, 9]  # each row's own max_new_tokens


def test_top_k_1_is_greedy_and_a_seed_fixes_the_sample():
  eng = _engine()
  prompt = PROMPTS[2]
  greedy = eng.generate_one(prompt, SP(max_new_tokens=8)).tokens
  assert eng.generate_one(prompt, SP(temperature=1.0, top_k=1, max_new_tokens=8)).tokens == greedy
  a, b, c = (eng.generate_one(prompt, SP(temperature=1.0, seed=s, max_new_tokens=8)).tokens for s in (3, 3, 4))
  assert a == b and a != c
  # Samples of one prompt differ from each other, and each is reproducible.
  s0, s1 = (eng.generate_one(prompt, SP(temperature=1.0, seed=3, max_new_tokens=8), sample=i).tokens
            for i in (0, 1))
  assert s0 == a and s1 != s0


def test_greedy_pick_is_argmax_first_index_on_ties():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 300)).astype(np.float32)
  logits[:8] = np.round(logits[:8])  # many ties for the largest value
  logits[8, :] = 3.0  # all tied: the first
  logits[9, [5, 200]] = np.inf
  logits[10] = -np.inf
  np.testing.assert_array_equal(np.asarray(jax.jit(sampling.first_max)(jnp.asarray(logits))), np.argmax(logits, -1))


def _draws(**knobs):
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draws = jax.jit(jax.vmap(lambda k: sampling.sample_logits(logits, k, **knobs)[0]))(keys)
  return set(np.asarray(draws).tolist())


def test_nucleus_and_min_p_keep_only_what_they_should():
  assert _draws(temperature=1.0, top_k=0, top_p=0.7) == {0, 1}
  assert _draws(temperature=1.0, top_k=0, top_p=1.0) == {0, 1, 2, 3}
  assert _draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5) == {0, 1}  # p >= 0.25
  assert _draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2) == {0, 1, 2}  # p >= 0.1
  assert _draws(temperature=1.0, top_k=3, top_p=1.0) == {0, 1, 2}


def test_repetition_penalty_shrinks_seen_logits_only():
  logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
  seen = jnp.array([[True, True, False, False]])
  out = sampling.penalise(logits, seen, jnp.array([2.0]))
  np.testing.assert_allclose(np.asarray(out), [[1.0, -4.0, 2.0, -2.0]])
  eng = _engine()
  plain = eng.generate_one(PROMPTS[0], SP(max_new_tokens=16)).tokens
  penalised = eng.generate_one(PROMPTS[0], SP(max_new_tokens=16, repetition_penalty=100.0)).tokens
  assert penalised != plain


def test_stop_tokens_end_a_row_with_reason_stop():
  eng = _engine()
  greedy = eng.generate_one(PROMPTS[0], SP(max_new_tokens=10)).tokens
  stop = greedy[3]
  first = greedy.index(stop)
  got = eng.generate_one(PROMPTS[0], SP(max_new_tokens=10, stop_tokens=(stop,)))
  assert got.tokens == greedy[:first + 1] and got.finish_reason == 'stop'
  # The engine's EOS stops too, unless ignored.
  eos_engine = decode.Engine(eng.model, eng.params, eos_id=stop)
  assert eos_engine.generate_one(PROMPTS[0], SP(max_new_tokens=10)).tokens == greedy[:first + 1]
  assert eos_engine.generate_one(PROMPTS[0], SP(max_new_tokens=10, ignore_eos=True)).tokens == greedy


def test_token_bytes_concatenate_to_the_decoded_text(tokenizer):
  pieces = stops.token_bytes(tokenizer, 512)
  rng = np.random.default_rng(0)
  text = 'def f(x):\n    return {"a": x ** 2}  # ünïcödé\n'
  checked = 0
  for ids in [tokenizer.encode(text)] + [rng.integers(260, tokenizer.vocab_size, 8).tolist() for _ in range(100)]:
    joined = b''.join(pieces[i] for i in ids)
    try:  # random byte pieces may not be UTF-8; sentencepiece and Python replace bad bytes differently
      joined = joined.decode('utf-8')
    except UnicodeDecodeError:
      continue
    assert joined == tokenizer.decode(ids)
    checked += 1
  assert checked > 90  # the byte pieces 4..259 left out of the random ids


def test_stop_strings_end_a_row_at_the_token_that_completes_them(tokenizer):
  _, model, params = _model()
  eng = decode.Engine(model, params, eos_id=-1, token_bytes=stops.token_bytes(tokenizer, 512))
  prompt = (1,) + tuple(tokenizer.encode('import os\n'))
  greedy = eng.generate_one(prompt, SP(max_new_tokens=24)).tokens
  text = tokenizer.decode(greedy)
  # A stop string that straddles a token boundary, taken from the middle of the text.
  start = len(tokenizer.decode(greedy[:5])) - 1
  stop = text[start:start + 3]
  want = next(j for j in range(1, len(greedy) + 1) if stop in tokenizer.decode(greedy[:j]))
  got = eng.generate([Request(prompt, SP(max_new_tokens=24, stop_strings=(stop,))),
                      Request(prompt, SP(max_new_tokens=24, stop_strings=('\x00never',)))])
  assert got[0].tokens == greedy[:want] and got[0].finish_reason == 'stop'
  assert got[1].tokens == greedy and got[1].finish_reason == 'length'
  assert stops.cut(tokenizer.decode(got[0].tokens), [stop]) == (text[:text.index(stop)], True)


def test_beam_width_1_is_greedy():
  eng = _engine()
  greedy = eng.generate_one(PROMPTS[1], SP(max_new_tokens=8)).tokens
  [[beam]] = eng.beam_search([PROMPTS[1]], BeamParams(num_beams=1, length_penalty=0.0, max_new_tokens=8))
  assert beam.tokens == greedy and beam.finish_reason == 'length'
  stop = greedy[2]
  [[beam]] = eng.beam_search([PROMPTS[1]], BeamParams(num_beams=1, length_penalty=0.0, max_new_tokens=8,
                                                      stop_tokens=(stop,)))
  assert beam.tokens == greedy[:greedy.index(stop) + 1] and beam.finish_reason == 'stop'


def test_beam_search_finds_the_best_two_token_continuation_among_its_beams():
  W = 3
  eng = _engine(sharded=True)
  prompt = PROMPTS[0]
  first = jax.nn.log_softmax(_full_logits(prompt)[-1])
  best = None
  for t1 in np.argsort(-np.asarray(first))[:W]:  # step 1 keeps the W best first tokens
    second = jax.nn.log_softmax(_full_logits(prompt + (int(t1),))[-1])
    t2 = int(jnp.argmax(second))
    score = float(first[t1] + second[t2])
    if best is None or score > best[0]:
      best = (score, [int(t1), t2])
  [beams] = eng.beam_search([prompt], BeamParams(num_beams=W, length_penalty=0.0, max_new_tokens=2))
  assert beams[0].tokens == best[1]
  np.testing.assert_allclose(beams[0].logprob, best[0], atol=1e-4)
  assert len(beams) == W and [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_beam_scores_are_logprob_over_the_length_penalty(alpha):
  [beams, _] = _engine().beam_search(PROMPTS[:2], BeamParams(num_beams=2, length_penalty=alpha, max_new_tokens=5))
  for b in beams:
    np.testing.assert_allclose(b.score, b.logprob / ((5 + len(b.tokens)) / 6) ** alpha, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _learned_model():
  """GPT-2-style learned positions with a table (100 rows) that is not a multiple of the prompt padding (64)."""
  cfg = tiny_config(('model.position_type', 'learned'), ('model.max_positions', '100'), ('data.seq_len', '100'))
  model = build_model(cfg.model)
  return model, init_params(model, jax.random.PRNGKey(1))


def test_learned_positions_decode_and_score_prompts_padded_past_the_table():
  """A 70-token prompt pads to 128 > max_positions=100: the padding must not look up rows the table lacks
  (jnp.take fills them with NaN, which masked keys still carry into every row's attention sum)."""
  from llm_jax.infer import loglik
  model, params = _learned_model()
  engine = decode.Engine(model, params, eos_id=-1)
  long = tuple(int(t) for t in np.random.default_rng(0).integers(3, 500, 70))
  short = PROMPTS[0]
  # The unpadded forward pass's logits: the model is causal, so tokens after the first n change nothing.
  forward = jax.jit(lambda tokens_1T: model.apply({'params': params}, tokens_1T, jnp.arange(100)[None],
                                                  jnp.ones_like(tokens_1T))[0][0])

  def logprobs_of(tokens):
    return jax.nn.log_softmax(forward(jnp.asarray([list(tokens) + [0] * (100 - len(tokens))])))[:len(tokens)]

  def greedy(prompt, n):
    tokens, logprobs = list(prompt), []
    for _ in range(n):
      last = logprobs_of(tokens)[-1]
      tokens.append(int(jnp.argmax(last)))
      logprobs.append(float(last[tokens[-1]]))
    return tokens[len(prompt):], logprobs

  got = engine.generate([Request(long, SP(max_new_tokens=4)), Request(short, SP(max_new_tokens=4))])
  for prompt, result in zip((long, short), got):  # the short one batched with the long one too
    tokens, logprobs = greedy(prompt, 4)
    assert result.tokens == tokens
    np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-4)

  whole = long + (7,) * 30  # 99 inputs: the whole context
  want = jnp.take_along_axis(logprobs_of(whole[:-1]), jnp.asarray(whole[1:])[:, None], axis=-1)[:, 0]
  for seqs in ([whole], [long]):
    [scores] = loglik.score(engine, seqs)
    np.testing.assert_allclose(scores.logprobs, want[:len(seqs[0]) - 1], atol=1e-4)
