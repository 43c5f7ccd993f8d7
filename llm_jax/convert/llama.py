"""LLaMA (LlamaForCausalLM): the decoder of the tiny recipe. Rotary positions in Hugging Face's layout (the
two halves of the head dimension), so weights load without permutation."""

from __future__ import annotations

from llm_jax.convert.mapping import TO_HF_ACTIVATION, HFConfig, Tensor, differences, tied, token_ids
from llm_jax.errors import UserError

MODEL_TYPE = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = (r'rotary_emb\.inv_freq$',)


def config_from_hf(hf: HFConfig, weights) -> dict:
  rope = hf.get('rope_parameters', {}) or {}
  hf.refuse('rope_scaling', lambda v: not v, 'rotary scaling; plain rotary positions only')
  if rope.get('rope_type', 'default') != 'default':
    raise UserError(f'{hf.where}: config.json rope_parameters={rope!r} is not supported (plain rotary positions '
                    'only)')
  D, N = hf.need('hidden_size'), hf.need('num_attention_heads')
  bias = bool(hf.get('attention_bias', False))
  hf.refuse('mlp_bias', lambda v: bool(v) == bias, 'biases on attention and MLP together or on neither')
  model = dict(family='decoder', vocab_size=hf.need('vocab_size'), num_layers=hf.need('num_hidden_layers'),
               embed_dim=D, num_heads=N, num_kv_heads=hf.get('num_key_value_heads', N),
               head_dim=hf.get('head_dim', D // N), mlp_dim=hf.need('intermediate_size'), norm_type='rms',
               norm_position='pre', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
               mlp_activation=hf.activation('hidden_act', 'silu'), mlp_gated=True, use_bias=bias,
               position_type='rope', rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
               tie_embeddings=tied(weights, hf, 'lm_head.weight', 'model.embed_tokens.weight', default=False))
  data = dict(objective='causal', seq_len=min(hf.get('max_position_embeddings', 2048), 2048), add_bos=True,
              add_eos=True)
  return {'model': model, 'data': data}


def mismatches(m) -> list[str]:
  return differences(m, family='decoder', position_type='rope', norm_type='rms', norm_position='pre',
                     mlp_gated=True, scale_attention=True, type_vocab_size=0)


def config_to_hf(cfg, tokenizer) -> dict:
  m = cfg.model
  return {
      'architectures': [ARCHITECTURE], 'model_type': MODEL_TYPE, 'vocab_size': m.vocab_size,
      'hidden_size': m.embed_dim, 'intermediate_size': m.mlp_dim, 'num_hidden_layers': m.num_layers,
      'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads, 'head_dim': m.head_dim,
      'hidden_act': TO_HF_ACTIVATION[m.mlp_activation], 'max_position_embeddings': cfg.data.seq_len,
      'rms_norm_eps': m.norm_eps, 'rope_theta': m.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': m.rope_theta},
      'attention_bias': m.use_bias, 'mlp_bias': m.use_bias, 'tie_word_embeddings': m.tie_embeddings,
      'attention_dropout': 0.0, 'torch_dtype': 'float32', **token_ids(tokenizer, 'bos', 'eos', 'pad'),
  }


def table(m) -> list[Tensor]:
  layer = 'model.layers.{i}'
  out = [Tensor('embedding', 'model.embed_tokens.weight'),
         Tensor('layers/attn_norm/scale', f'{layer}.input_layernorm.weight'),
         Tensor('layers/mlp_norm/scale', f'{layer}.post_attention_layernorm.weight'),
         Tensor('final_norm/scale', 'model.norm.weight')]
  for ours, hf in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('o', 'o_proj')):
    out.append(Tensor(f'layers/attn/{ours}', f'{layer}.self_attn.{hf}.weight', 'linear',
                      in_dims=2 if ours == 'o' else 1))
    if m.use_bias:
      out.append(Tensor(f'layers/attn/{ours}_bias', f'{layer}.self_attn.{hf}.bias', flat=True))
  for ours in ('gate', 'up', 'down'):
    out.append(Tensor(f'layers/mlp/{ours}', f'{layer}.mlp.{ours}_proj.weight', 'linear'))
    if m.use_bias:
      out.append(Tensor(f'layers/mlp/{ours}_bias', f'{layer}.mlp.{ours}_proj.bias'))
  if not m.tie_embeddings:
    out.append(Tensor('unembed', 'lm_head.weight', 'linear'))
  return out

