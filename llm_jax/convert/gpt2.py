"""GPT-2 (GPT2LMHeadModel, or a bare GPT2Model): the decoder of the gpt2_124m recipe. Its Conv1D layers store
[in, out] matrices, and c_attn holds the query, key and value projections side by side."""

from __future__ import annotations

from llm_jax.convert.mapping import TO_HF_ACTIVATION, HFConfig, Tensor, differences, tied, token_ids

MODEL_TYPE = 'gpt2'
ARCHITECTURE = 'GPT2LMHeadModel'
OPTIONAL_PREFIX = 'transformer.'  # GPT2Model checkpoints (the original gpt2 upload) name tensors without it
IGNORE = (r'\.attn\.(masked_)?bias$',)  # causal-mask buffers of older checkpoints
HARMLESS = ('n_ctx', 'reorder_and_upcast_attn', 'summary_type', 'summary_use_proj', 'summary_activation',
            'summary_proj_to_labels')  # n_ctx: n_positions again; the rest: the double-heads model's extra head


def config_from_hf(hf: HFConfig, weights) -> dict:
  D, N = hf.need('n_embd'), hf.need('n_head')
  hf.refuse('scale_attn_weights', lambda v: v is None or v, 'unscaled attention logits')
  hf.refuse('scale_attn_by_inverse_layer_idx', lambda v: not v, 'attention scaled by layer index')
  hf.refuse('add_cross_attention', lambda v: not v, 'cross-attention')
  positions = hf.need('n_positions')
  model = dict(family='decoder', vocab_size=hf.need('vocab_size'), num_layers=hf.need('n_layer'), embed_dim=D,
               num_heads=N, num_kv_heads=N, head_dim=D // N, mlp_dim=hf.get('n_inner', 4 * D), norm_type='layer',
               norm_position='pre', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
               mlp_activation=hf.activation('activation_function', 'gelu_new'), mlp_gated=False, use_bias=True,
               position_type='learned', max_positions=positions,
               tie_embeddings=tied(weights, hf, 'lm_head.weight', 'transformer.wte.weight'))
  data = dict(objective='causal', seq_len=min(positions, 1024), add_bos=False, add_eos=True)
  return {'model': model, 'data': data}


def mismatches(m) -> list[str]:
  out = differences(m, family='decoder', position_type='learned', norm_type='layer', norm_position='pre',
                    mlp_gated=False, use_bias=True, scale_attention=True, type_vocab_size=0,
                    num_kv_heads=m.num_heads)
  if m.num_heads * m.head_dim != m.embed_dim:
    out.append(f'model.num_heads x model.head_dim = {m.num_heads * m.head_dim} (needs model.embed_dim)')
  return out


def config_to_hf(cfg, tokenizer) -> dict:
  m = cfg.model
  return {
      'architectures': [ARCHITECTURE], 'model_type': MODEL_TYPE, 'vocab_size': m.vocab_size, 'n_embd': m.embed_dim,
      'n_layer': m.num_layers, 'n_head': m.num_heads, 'n_inner': m.mlp_dim, 'n_positions': m.max_positions,
      'activation_function': TO_HF_ACTIVATION[m.mlp_activation], 'layer_norm_epsilon': m.norm_eps,
      'resid_pdrop': m.dropout_rate, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'tie_word_embeddings': m.tie_embeddings,
      'torch_dtype': 'float32', **token_ids(tokenizer, 'bos', 'eos'),
  }


def table(m) -> list[Tensor]:
  h = 'transformer.h.{i}'
  out = [Tensor('embedding', 'transformer.wte.weight'), Tensor('pos_embedding', 'transformer.wpe.weight')]
  for ours, hf in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
    out += [Tensor(f'layers/{ours}/scale', f'{h}.{hf}.weight'), Tensor(f'layers/{ours}/bias', f'{h}.{hf}.bias')]
  for part, ours in enumerate(('q', 'k', 'v')):
    out += [Tensor(f'layers/attn/{ours}', f'{h}.attn.c_attn.weight', 'conv1d', part=part, parts=3),
            Tensor(f'layers/attn/{ours}_bias', f'{h}.attn.c_attn.bias', flat=True, part=part, parts=3)]
  out += [Tensor('layers/attn/o', f'{h}.attn.c_proj.weight', 'conv1d', in_dims=2),
          Tensor('layers/attn/o_bias', f'{h}.attn.c_proj.bias'),
          Tensor('layers/mlp/up', f'{h}.mlp.c_fc.weight', 'conv1d'), Tensor('layers/mlp/up_bias', f'{h}.mlp.c_fc.bias'),
          Tensor('layers/mlp/down', f'{h}.mlp.c_proj.weight', 'conv1d'),
          Tensor('layers/mlp/down_bias', f'{h}.mlp.c_proj.bias'),
          Tensor('final_norm/scale', 'transformer.ln_f.weight'), Tensor('final_norm/bias', 'transformer.ln_f.bias')]
  if not m.tie_embeddings:
    out.append(Tensor('unembed', 'lm_head.weight', 'linear'))
  return out
