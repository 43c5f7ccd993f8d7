"""Properties of the GPT-2, BERT and T5 layouts: who sees whom (causal, bidirectional, cross-attention, packed
documents), cached decoding equals the full forward pass, scanned layers equal the loop, T5's buckets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import recipe_config

from llm_jax.models import build_model, encdec, init_cache
from llm_jax.models.positions import relative_bucket
from llm_jax.train.state import init_params

B = 2


class _Jitted:
  """The model with `apply` compiled once per shape: op-by-op execution would take minutes on 2 cores."""

  def __init__(self, model):
    self.module = model
    self.apply = jax.jit(model.apply, static_argnames=('step', 'hidden_only'))


@functools.lru_cache(maxsize=None)
def _setup(name, *overrides):
  """One model, its params and its compiled apply per recipe, shared by the tests (compiling dominates)."""
  cfg = recipe_config(name, *overrides)
  model = build_model(cfg.model)
  return cfg, _Jitted(model), jax.jit(lambda rng: init_params(model, rng))(jax.random.PRNGKey(0))


def _tokens(seed, t, b=B):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 4, 500, dtype=jnp.int32)


def _pos(t, b=B):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _changed(tokens, t):
  return tokens.at[:, t].set((tokens[:, t] + 7) % 500 + 4)


def test_gpt2_decoder_is_causal_and_its_cache_equals_the_full_pass():
  cfg, model, params = _setup('gpt2_124m')
  assert 'pos_embedding' in params and 'unembed' not in params  # learned positions, tied output
  assert 'bias' in params['final_norm'] and 'up_bias' in params['layers']['mlp']
  T = 16
  tokens = _tokens(0, T)
  run = lambda toks: model.apply({'params': params}, toks, _pos(T), jnp.ones_like(toks))[0]  # noqa: E731
  full = run(tokens)
  out = run(_changed(tokens, 9))
  np.testing.assert_array_equal(np.asarray(out[:, :9]), np.asarray(full[:, :9]))
  assert not np.allclose(out[:, 9:], full[:, 9:])
  cache = init_cache(cfg.model, B, T)
  logits, cache = model.apply({'params': params}, tokens[:, :7], _pos(7), jnp.ones((B, 7), jnp.int32), cache=cache)
  steps = [logits]
  for t in range(7, T):
    logits, cache = model.apply({'params': params}, tokens[:, t:t + 1], jnp.full((B, 1), t, jnp.int32),
                                jnp.ones((B, 1), jnp.int32), cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_bert_encoder_sees_both_ways_within_its_document_only():
  _, model, params = _setup('bert_base')
  T = 16
  tokens = _tokens(1, T)
  segments = jnp.array([[1] * 7 + [2] * 6 + [0] * 3] * B, jnp.int32)
  positions = jnp.array([list(range(7)) + list(range(6)) + [0] * 3] * B, jnp.int32)
  run = lambda toks: model.apply({'params': params}, toks, positions, segments)[0]  # noqa: E731
  base = run(tokens)
  out = run(_changed(tokens, 5))  # a late token of document 1 changes its earlier logits: bidirectional
  assert not np.allclose(out[:, :5], base[:, :5])
  np.testing.assert_array_equal(np.asarray(out[:, 7:13]), np.asarray(base[:, 7:13]))
  alone = model.apply({'params': params}, tokens[:, 7:13], positions[:, 7:13], jnp.ones((B, 6), jnp.int32))[0]
  np.testing.assert_allclose(np.asarray(base[:, 7:13]), np.asarray(alone), atol=1e-5, rtol=1e-5)
  hidden = model.apply({'params': params}, tokens, positions, segments, hidden_only=True)
  assert hidden.shape == (B, T, 64)


def _t5(params, model, enc, dec, enc_seg=None, dec_seg=None, enc_pos=None, dec_pos=None):
  S, T = enc.shape[1], dec.shape[1]
  enc_seg = jnp.ones_like(enc) if enc_seg is None else enc_seg
  dec_seg = jnp.ones_like(dec) if dec_seg is None else dec_seg
  enc_pos = _pos(S, enc.shape[0]) if enc_pos is None else enc_pos
  dec_pos = _pos(T, dec.shape[0]) if dec_pos is None else dec_pos
  return model.apply({'params': params}, enc, enc_pos, enc_seg, dec, dec_pos, dec_seg)[0]


def test_t5_decoder_is_causal_and_reads_the_whole_encoder_input():
  _, model, params = _setup('t5_small')
  enc, dec = _tokens(2, 12), _tokens(3, 8)
  base = _t5(params, model, enc, dec)
  out = _t5(params, model, enc, _changed(dec, 4))
  np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(base[:, :4]))
  assert not np.allclose(out[:, 4:], base[:, 4:])
  out = _t5(params, model, _changed(enc, 11), dec)  # the last input token reaches the first target
  assert not np.allclose(out[:, 0], base[:, 0])


def test_t5_packed_pairs_never_see_each_other():
  _, model, params = _setup('t5_small')
  enc, dec = _tokens(4, 12), _tokens(5, 8)
  enc_seg = jnp.array([[1] * 5 + [2] * 6 + [0]] * B, jnp.int32)
  enc_pos = jnp.array([list(range(5)) + list(range(6)) + [0]] * B, jnp.int32)
  dec_seg = jnp.array([[1] * 3 + [2] * 4 + [0]] * B, jnp.int32)
  dec_pos = jnp.array([list(range(3)) + list(range(4)) + [0]] * B, jnp.int32)
  base = _t5(params, model, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos)
  out = _t5(params, model, _changed(enc, 2), dec, enc_seg, dec_seg, enc_pos, dec_pos)
  np.testing.assert_array_equal(np.asarray(out[:, 3:7]), np.asarray(base[:, 3:7]))
  assert not np.allclose(out[:, :3], base[:, :3])
  # Pair 2 scores exactly as if it were alone in its rows.
  alone = _t5(params, model, enc[:, 5:11], dec[:, 3:7])
  np.testing.assert_allclose(np.asarray(base[:, 3:7]), np.asarray(alone), atol=1e-5, rtol=1e-5)


def test_t5_decoder_segment_without_encoder_tokens_reads_no_other_example():
  """Targets of segment 2 whose inputs are not in the row (an example cut across rows) get no
  cross-attention: before, a softmax over all-masked keys spread them over segment 1's inputs."""
  _, model, params = _setup('t5_small')
  enc, dec = _tokens(4, 12), _tokens(5, 8)
  enc_seg = jnp.array([[1] * 11 + [0]] * B, jnp.int32)
  enc_pos = jnp.array([list(range(11)) + [0]] * B, jnp.int32)
  dec_seg = jnp.array([[1] * 3 + [2] * 4 + [0]] * B, jnp.int32)
  dec_pos = jnp.array([list(range(3)) + list(range(4)) + [0]] * B, jnp.int32)
  base = _t5(params, model, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos)
  for t in (0, 5, 10):
    out = _t5(params, model, _changed(enc, t), dec, enc_seg, dec_seg, enc_pos, dec_pos)
    np.testing.assert_array_equal(np.asarray(out[:, 3:7]), np.asarray(base[:, 3:7]))
    assert not np.allclose(out[:, :3], base[:, :3])  # segment 1 still reads its inputs


def test_t5_cached_decoding_equals_the_full_pass():
  cfg, model, params = _setup('t5_small')
  S, T = 10, 7
  enc, dec = _tokens(6, S), _tokens(7, T)
  enc_seg = jnp.array([[1] * S, [1] * 6 + [0] * 4], jnp.int32)  # row 1: a prompt of 6, right-padded
  full_row0 = _t5(params, model, enc, dec)[0]
  full_row1 = _t5(params, model, enc[1:, :6], dec[1:])[0]
  cache = encdec.init_cache(cfg.model, B, S, T)
  logits, cache = model.apply({'params': params}, enc, _pos(S), enc_seg, dec[:, :1], _pos(1), jnp.ones((B, 1),
                              jnp.int32), cache=cache)
  steps = [logits]
  for t in range(1, T):
    logits, cache = model.apply({'params': params}, None, None, None, dec[:, t:t + 1], jnp.full((B, 1), t, jnp.int32),
                                jnp.ones((B, 1), jnp.int32), cache=cache, step=True)
    steps.append(logits)
  got = jnp.concatenate(steps, 1)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(full_row0), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(full_row1), atol=1e-5, rtol=1e-5)


def test_t5_scanned_layers_equal_the_loop():
  cfg, scanned, params = _setup('t5_small')
  looped = _Jitted(build_model(recipe_config('t5_small', ('model.scan_layers', 'false')).model))
  loop_params = {k: v for k, v in params.items() if k not in ('encoder_layers', 'decoder_layers')}
  for stack in ('encoder_layers', 'decoder_layers'):
    for i in range(2):
      loop_params[f'{stack}_{i}'] = jax.tree.map(lambda a, i=i: a[i], params[stack])
  want = jax.tree.map(jnp.shape, init_params(looped.module, jax.random.PRNGKey(0)))
  assert jax.tree.map(jnp.shape, loop_params) == want
  enc, dec = _tokens(8, 12), _tokens(9, 8)  # the shapes of the tests above: compiled once
  np.testing.assert_allclose(np.asarray(_t5(params, scanned, enc, dec)), np.asarray(_t5(loop_params, looped, enc, dec)),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_buckets_are_exact_near_and_logarithmic_far(bidirectional):
  rel = jnp.arange(-300, 301)[None, None]
  b = np.asarray(relative_bucket(rel, bidirectional, 32, 128))[0, 0]
  half = 16 if bidirectional else 32
  exact = half // 2
  back = b[:300][::-1]  # key before the query: distances 1, 2, ...
  np.testing.assert_array_equal(back[:exact - 1], np.arange(1, exact))  # one bucket per near distance
  assert np.all(np.diff(back) >= 0) and back.max() == half - 1  # wider buckets further off, capped
  assert np.all(back[127:] == half - 1)  # from max_distance on: the last bucket
  fwd = b[301:]
  if bidirectional:
    assert fwd.min() >= half and np.all(np.diff(fwd) >= 0)  # keys after the query: their own buckets
  else:
    assert np.all(fwd == 0)  # a causal decoder never looks ahead: one shared bucket


def test_biases_and_position_tables_are_not_decayed_or_counted_as_matmuls():
  from llm_jax.models import flops
  from llm_jax.train import optim
  for name in ('gpt2_124m', 'bert_base', 't5_small'):
    cfg = recipe_config(name)
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg.model), jax.random.PRNGKey(0)))
    decayed = {jax.tree_util.keystr(p): d for p, d in
               jax.tree_util.tree_leaves_with_path(optim.decay_mask(decay_embeddings=False)(shapes))}
    for path, d in decayed.items():
      if 'bias' in path or 'norm' in path or 'embedding' in path:
        assert not d, (name, path)
    assert decayed["['layers']['attn']['q']"] if 'layers' in shapes else decayed["['encoder_layers']['attn']['q']"]
    matmuls = flops.matmul_params(cfg.model)
    biases = sum(int(np.prod(a.shape)) for p, a in jax.tree_util.tree_leaves_with_path(shapes)
                 if jax.tree_util.keystr(p).endswith("_bias']"))
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert matmuls < total - biases


def test_encoder_decoder_flops_count_each_stack_by_its_own_length():
  """t5_small by hand: the encoder and the cross-attention keys and values run on the 512 input tokens, the
  rest of the decoder and the tied output layer on the 114 targets; three attentions (issue 15: every weight
  on every input token and no decoder attention overstated MFU about 1.84x)."""
  from llm_jax import config as config_lib
  from llm_jax.models import flops
  cfg = config_lib.load('t5_small')  # the full shapes
  m, S, T = cfg.model, cfg.data.seq_len, cfg.data.target_len
  assert (m.embed_dim, m.num_heads * m.head_dim, m.mlp_dim, m.vocab_size, S, T) == (512, 512, 2048, 32128, 512, 114)
  d, a, F, V = 512, 512, 2048, 32128
  encoder = 6 * (4 * d * a + 2 * d * F)  # q k v o, up down; six layers
  cross_kv = 6 * 2 * d * a
  decoder = 6 * (4 * d * a + 2 * d * a + 2 * d * F) + V * d  # self q k v o, cross q o, MLP; output (tied)
  row = 6 * (encoder + cross_kv) * S + 6 * decoder * T + 12 * a * (6 * S * S + 6 * T * T + 6 * T * S)
  assert flops.matmul_params(m) == encoder + cross_kv + decoder
  assert flops.flops_per_token(m, S, T) == pytest.approx(row / S, rel=1e-12)
  with pytest.raises(ValueError, match='target_len'):
    flops.flops_per_token(m, S)


def test_lora_flops_are_the_frozen_base_forward_and_input_gradients_plus_the_adapters():
  from llm_jax.models import flops
  cfg = recipe_config('gpt2_124m', ('model.lora.rank', '4'), ('model.lora.targets', "('q', 'v')"))
  m, S = cfg.model, cfg.data.seq_len
  base = flops.matmul_params(recipe_config('gpt2_124m').model)
  adapters = m.num_layers * 2 * (m.embed_dim * 4 + 4 * m.num_heads * m.head_dim)  # A: d x r, B: r x (N H)
  assert flops.matmul_params(m) == base + adapters
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * S
  assert flops.flops_per_token(m, S) == 4 * base + 6 * adapters + attention
