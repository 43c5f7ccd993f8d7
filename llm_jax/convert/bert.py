"""BERT (BertForMaskedLM, or a bare BertModel such as all-MiniLM-L6-v2): the encoder of the bert_base recipe.

A bare BertModel has no masked-LM head: its head starts from an initialisation (dense layer drawn with the
model's init_std and seed 0, norm at one, biases zero), and its next-sentence pooler, which llm-jax has no
use for, is left out. Both are said when converting."""

from __future__ import annotations

import numpy as np

from llm_jax.convert.mapping import TO_HF_ACTIVATION, HFConfig, Tensor, differences, tied, token_ids

MODEL_TYPE = 'bert'
ARCHITECTURE = 'BertForMaskedLM'
OPTIONAL_PREFIX = 'bert.'
IGNORE = (r'embeddings\.position_ids$', r'^(bert\.)?pooler\.', r'^cls\.seq_relationship\.',
          r'^cls\.predictions\.decoder\.bias$')  # the last is a second name of cls.predictions.bias
HARMLESS = ()
HEAD = ('head_dense', 'head_dense_bias', 'head_norm/scale', 'head_norm/bias', 'unembed_bias')


def config_from_hf(hf: HFConfig, weights) -> dict:
  D, N = hf.need('hidden_size'), hf.need('num_attention_heads')
  hf.refuse('position_embedding_type', lambda v: v in (None, 'absolute'), 'absolute positions only')
  hf.refuse('is_decoder', lambda v: not v, 'a BERT decoder')
  hf.refuse('add_cross_attention', lambda v: not v, 'cross-attention')
  positions = hf.need('max_position_embeddings')
  model = dict(family='encoder', vocab_size=hf.need('vocab_size'), num_layers=hf.need('num_hidden_layers'),
               embed_dim=D, num_heads=N, num_kv_heads=N, head_dim=D // N, mlp_dim=hf.need('intermediate_size'),
               norm_type='layer', norm_position='post', norm_eps=float(hf.get('layer_norm_eps', 1e-12)),
               mlp_activation=hf.activation('hidden_act', 'gelu'), mlp_gated=False, use_bias=True,
               position_type='learned', max_positions=positions, type_vocab_size=hf.get('type_vocab_size', 2),
               tie_embeddings=tied(weights, hf, 'cls.predictions.decoder.weight',
                                   'bert.embeddings.word_embeddings.weight'))
  data = dict(objective='mlm', seq_len=min(positions, 512), add_bos=True, add_eos=True)
  return {'model': model, 'data': data}


def head_defaults(m, has_head: bool) -> dict:
  """Initial values of the masked-LM head, for checkpoints without one."""
  if has_head:
    return {}
  rng = np.random.default_rng(0)
  D = m.embed_dim
  return {'head_dense': rng.normal(0.0, m.init_std, (D, D)), 'head_dense_bias': np.zeros(D),
          'head_norm/scale': np.ones(D), 'head_norm/bias': np.zeros(D), 'unembed_bias': np.zeros(m.vocab_size)}


def mismatches(m) -> list[str]:
  out = differences(m, family='encoder', position_type='learned', norm_type='layer', norm_position='post',
                    mlp_gated=False, use_bias=True, scale_attention=True, num_kv_heads=m.num_heads)
  if m.num_heads * m.head_dim != m.embed_dim:
    out.append(f'model.num_heads x model.head_dim = {m.num_heads * m.head_dim} (needs model.embed_dim)')
  return out


def config_to_hf(cfg, tokenizer) -> dict:
  m = cfg.model
  return {
      'architectures': [ARCHITECTURE], 'model_type': MODEL_TYPE, 'vocab_size': m.vocab_size,
      'hidden_size': m.embed_dim, 'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'intermediate_size': m.mlp_dim, 'hidden_act': TO_HF_ACTIVATION[m.mlp_activation],
      'max_position_embeddings': m.max_positions, 'type_vocab_size': max(m.type_vocab_size, 1),
      'layer_norm_eps': m.norm_eps, 'hidden_dropout_prob': m.dropout_rate, 'attention_probs_dropout_prob': 0.0,
      'position_embedding_type': 'absolute', 'tie_word_embeddings': m.tie_embeddings, 'torch_dtype': 'float32',
      **token_ids(tokenizer, 'pad'),
  }


def extra_tensors(m, params) -> dict:
  """BERT always has a token-type table: a model without one gets a single zero row (adds nothing)."""
  if m.type_vocab_size:
    return {}
  return {'bert.embeddings.token_type_embeddings.weight': np.zeros((1, m.embed_dim), np.float32)}


def table(m) -> list[Tensor]:
  layer = 'bert.encoder.layer.{i}'
  out = [Tensor('embedding', 'bert.embeddings.word_embeddings.weight'),
         Tensor('pos_embedding', 'bert.embeddings.position_embeddings.weight'),
         Tensor('embed_norm/scale', 'bert.embeddings.LayerNorm.weight'),
         Tensor('embed_norm/bias', 'bert.embeddings.LayerNorm.bias')]
  if m.type_vocab_size:
    out.append(Tensor('type_embedding', 'bert.embeddings.token_type_embeddings.weight'))
  for ours in ('query', 'key', 'value'):
    out += [Tensor(f'layers/attn/{ours[0]}', f'{layer}.attention.self.{ours}.weight', 'linear'),
            Tensor(f'layers/attn/{ours[0]}_bias', f'{layer}.attention.self.{ours}.bias', flat=True)]
  out += [Tensor('layers/attn/o', f'{layer}.attention.output.dense.weight', 'linear', in_dims=2),
          Tensor('layers/attn/o_bias', f'{layer}.attention.output.dense.bias'),
          Tensor('layers/attn_norm/scale', f'{layer}.attention.output.LayerNorm.weight'),
          Tensor('layers/attn_norm/bias', f'{layer}.attention.output.LayerNorm.bias'),
          Tensor('layers/mlp/up', f'{layer}.intermediate.dense.weight', 'linear'),
          Tensor('layers/mlp/up_bias', f'{layer}.intermediate.dense.bias'),
          Tensor('layers/mlp/down', f'{layer}.output.dense.weight', 'linear'),
          Tensor('layers/mlp/down_bias', f'{layer}.output.dense.bias'),
          Tensor('layers/mlp_norm/scale', f'{layer}.output.LayerNorm.weight'),
          Tensor('layers/mlp_norm/bias', f'{layer}.output.LayerNorm.bias'),
          Tensor('head_dense', 'cls.predictions.transform.dense.weight', 'linear'),
          Tensor('head_dense_bias', 'cls.predictions.transform.dense.bias'),
          Tensor('head_norm/scale', 'cls.predictions.transform.LayerNorm.weight'),
          Tensor('head_norm/bias', 'cls.predictions.transform.LayerNorm.bias'),
          Tensor('unembed_bias', 'cls.predictions.bias')]
  if not m.tie_embeddings:
    out.append(Tensor('unembed', 'cls.predictions.decoder.weight', 'linear'))
  return out
