"""LLaMA 1-3.x (LlamaForCausalLM): the decoder of the tiny recipe. Rotary positions in Hugging Face's layout
(the two halves of the head dimension), so weights load without permutation; Llama 3.1's rotary scaling
(rope_type 'llama3') and linear scaling load, other rope types are refused by name.

The helpers here are shared by the architectures that are LLaMA with a difference (qwen2.py, qwen3.py,
mistral.py, gemma2.py): each names its `LAYOUT`, the model keys that tell it apart, which `from-hf` sets
and `to-hf` requires.
"""

from __future__ import annotations

from llm_jax.convert.mapping import TO_HF_ACTIVATION, HFConfig, Tensor, differences, tied, token_ids
from llm_jax.errors import UserError

MODEL_TYPE = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = (r'rotary_emb\.inv_freq$',)
HARMLESS = ('pretraining_tp',)  # transformers' slicing of the matmuls for tensor-parallel pretraining: same sums

# The keys of the layouts beyond LLaMA's, at their LLaMA values; each architecture overrides its own.
PLAIN = dict(qkv_bias=False, qk_norm=False, sliding_window=0, global_every=0, query_scale=0,
             attn_logit_softcap=0.0, final_logit_softcap=0.0, norm_offset=False, embed_scale=False,
             post_norms=False)
LAYOUT = PLAIN

# rope_parameters (transformers >= 5) or rope_scaling (before) keys each rope type is read with.
_ROPE_KEYS = {'default': (), 'linear': ('factor',),
              'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')}


def rope_from_hf(hf: HFConfig) -> tuple[float, dict]:
  """(rope_theta, model.rope_scaling) from config.json; a rope type or a parameter of it llm-jax does not
  have stops the conversion, naming it."""
  params = dict(hf.get('rope_scaling', {}) or {})  # transformers < 5: the scaling alone, theta beside it
  params.update(hf.get('rope_parameters', {}) or {})
  kind = params.pop('rope_type', params.pop('type', 'default'))
  if kind not in _ROPE_KEYS:
    raise UserError(f'{hf.where}: config.json rotary scaling rope_type={kind!r} is not supported (llm-jax has '
                    f'{", ".join(map(repr, _ROPE_KEYS))})')
  theta = float(params.pop('rope_theta', hf.get('rope_theta', 10000.0)))
  values = {}
  for key in _ROPE_KEYS[kind]:
    if params.get(key) is None:
      raise UserError(f'{hf.where}: config.json rotary scaling rope_type={kind!r} has no {key}')
    values[key] = params.pop(key)
  if params:
    key = sorted(params)[0]
    raise UserError(f'{hf.where}: config.json rotary scaling {key}={params[key]!r} is not supported for '
                    f'rope_type={kind!r}')
  scaling = {'type': 'none' if kind == 'default' else kind}
  if 'factor' in values:
    scaling['factor'] = float(values['factor'])
  if kind == 'llama3':
    scaling.update(low_freq_factor=float(values['low_freq_factor']),
                   high_freq_factor=float(values['high_freq_factor']),
                   original_max_positions=int(values['original_max_position_embeddings']))
  return theta, scaling


def rope_to_hf(m) -> dict:
  rs = m.rope_scaling
  params = {'rope_type': 'default' if rs.type == 'none' else rs.type, 'rope_theta': m.rope_theta}
  if rs.type != 'none':
    params['factor'] = rs.factor
  if rs.type == 'llama3':
    params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                  original_max_position_embeddings=rs.original_max_positions)
  return {'rope_theta': m.rope_theta, 'rope_parameters': params}


def full_attention_only(hf: HFConfig) -> None:
  """Qwen's config.json names sliding-window settings that its models leave off; on, they are refused."""
  hf.refuse('use_sliding_window', lambda v: not v, 'sliding-window attention on the lower layers only')
  hf.get('sliding_window'), hf.get('max_window_layers')  # read: without use_sliding_window they do nothing
  hf.refuse('layer_types', lambda v: not v or set(v) == {'full_attention'}, 'full attention on every layer')


def decoder_from_hf(hf: HFConfig, weights, *, act_key: str = 'hidden_act', use_bias: bool = False,
                    add_bos: bool = True, tie_default: bool = False, **layout) -> dict:
  """The sections of a LLaMA-like checkpoint's config, with `layout` (this architecture's keys of PLAIN)."""
  D, N = hf.need('hidden_size'), hf.need('num_attention_heads')
  theta, scaling = rope_from_hf(hf)
  model = dict(family='decoder', vocab_size=hf.need('vocab_size'), num_layers=hf.need('num_hidden_layers'),
               embed_dim=D, num_heads=N, num_kv_heads=hf.get('num_key_value_heads', N),
               head_dim=hf.get('head_dim', D // N), mlp_dim=hf.need('intermediate_size'), norm_type='rms',
               norm_position='pre', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
               mlp_activation=hf.activation(act_key, 'silu'), mlp_gated=True, use_bias=use_bias,
               position_type='rope', rope_theta=theta, rope_scaling=scaling,
               tie_embeddings=tied(weights, hf, 'lm_head.weight', 'model.embed_tokens.weight',
                                   default=tie_default),
               **{**PLAIN, **layout})
  data = dict(objective='causal', seq_len=min(hf.get('max_position_embeddings', 2048), 2048), add_bos=add_bos,
              add_eos=True)
  return {'model': model, 'data': data}


def config_from_hf(hf: HFConfig, weights) -> dict:
  bias = bool(hf.get('attention_bias', False))
  hf.refuse('mlp_bias', lambda v: bool(v) == bias, 'biases on attention and MLP together or on neither')
  return decoder_from_hf(hf, weights, use_bias=bias)


def decoder_mismatches(m, layout: dict, **more) -> list[str]:
  return differences(m, family='decoder', position_type='rope', norm_type='rms', norm_position='pre',
                     mlp_gated=True, scale_attention=True, type_vocab_size=0, **{**PLAIN, **layout}, **more)


def mismatches(m) -> list[str]:
  return decoder_mismatches(m, LAYOUT)


def decoder_config_to_hf(cfg, tokenizer, architecture: str, model_type: str, act_key: str = 'hidden_act') -> dict:
  m = cfg.model
  return {
      'architectures': [architecture], 'model_type': model_type, 'vocab_size': m.vocab_size,
      'hidden_size': m.embed_dim, 'intermediate_size': m.mlp_dim, 'num_hidden_layers': m.num_layers,
      'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads, 'head_dim': m.head_dim,
      act_key: TO_HF_ACTIVATION[m.mlp_activation], 'max_position_embeddings': cfg.data.seq_len,
      'rms_norm_eps': m.norm_eps, **rope_to_hf(m), 'tie_word_embeddings': m.tie_embeddings,
      'attention_dropout': 0.0, 'torch_dtype': 'float32', **token_ids(tokenizer, 'bos', 'eos', 'pad'),
  }


def config_to_hf(cfg, tokenizer) -> dict:
  m = cfg.model
  return {**decoder_config_to_hf(cfg, tokenizer, ARCHITECTURE, MODEL_TYPE), 'attention_bias': m.use_bias,
          'mlp_bias': m.use_bias}


def decoder_table(m, norms=(('attn_norm', 'input_layernorm'), ('mlp_norm', 'post_attention_layernorm'))
                  ) -> list[Tensor]:
  """LLaMA's tensor names; `norms` pairs our per-layer norms with theirs. Biases where the model has them:
  every projection (use_bias) or q, k, v alone (qkv_bias)."""
  layer = 'model.layers.{i}'
  out = [Tensor('embedding', 'model.embed_tokens.weight'), Tensor('final_norm/scale', 'model.norm.weight')]
  out += [Tensor(f'layers/{ours}/scale', f'{layer}.{hf}.weight') for ours, hf in norms]
  for ours, hf in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('o', 'o_proj')):
    out.append(Tensor(f'layers/attn/{ours}', f'{layer}.self_attn.{hf}.weight', 'linear',
                      in_dims=2 if ours == 'o' else 1))
    if m.use_bias or (m.qkv_bias and ours != 'o'):
      out.append(Tensor(f'layers/attn/{ours}_bias', f'{layer}.self_attn.{hf}.bias', flat=ours != 'o'))
  if m.qk_norm:
    out += [Tensor(f'layers/attn/{x}_norm/scale', f'{layer}.self_attn.{x}_norm.weight') for x in ('q', 'k')]
  for ours in ('gate', 'up', 'down'):
    out.append(Tensor(f'layers/mlp/{ours}', f'{layer}.mlp.{ours}_proj.weight', 'linear'))
    if m.use_bias:
      out.append(Tensor(f'layers/mlp/{ours}_bias', f'{layer}.mlp.{ours}_proj.bias'))
  if not m.tie_embeddings:
    out.append(Tensor('unembed', 'lm_head.weight', 'linear'))
  return out


def table(m) -> list[Tensor]:
  return decoder_table(m)
