"""T5 (T5ForConditionalGeneration): the encoder-decoder of the t5_small recipe. T5 v1.0 ties its output layer
to the embedding and scales the decoder's output by d_model ** -0.5 first; v1.1 has a separate, unscaled
output layer and a gated-GELU MLP. Both load; a tied but unscaled output (or the reverse) has no llm-jax
equivalent and is refused."""

from __future__ import annotations

from llm_jax.convert.mapping import HFConfig, Tensor, differences, token_ids
from llm_jax.errors import UserError

MODEL_TYPE = 't5'
ARCHITECTURE = 'T5ForConditionalGeneration'
OPTIONAL_PREFIX = ''
IGNORE = (r'^(encoder|decoder)\.embed_tokens\.weight$',)  # second names of `shared`
HARMLESS = ('is_gated_act', 'dense_act_fn', 'n_positions', 'is_decoder')  # from feed_forward_proj; unused


def _mlp(hf: HFConfig) -> tuple[str, bool]:
  proj = hf.get('feed_forward_proj', 'relu')
  gated = proj.startswith('gated-')
  act = proj[len('gated-'):] if gated else proj
  if proj == 'gated-gelu':  # transformers' special case: T5 v1.1's "gated-gelu" is the tanh approximation
    act = 'gelu_new'
  return HFConfig({'act': act}, hf.where).activation('act', 'relu'), gated


def config_from_hf(hf: HFConfig, weights) -> dict:
  act, gated = _mlp(hf)
  # transformers >= 5 writes scale_decoder_outputs; older configs say it with tie_word_embeddings.
  scaled = bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))
  separate_head = weights.has('lm_head.weight') and not _same(weights, 'lm_head.weight', 'shared.weight')
  if scaled == separate_head:
    raise UserError(f'{hf.where}: an output layer that is {"separate" if separate_head else "tied"} but '
                    f'{"scaled" if scaled else "not scaled"} by d_model ** -0.5 is not supported (T5 v1.0 ties and '
                    'scales, v1.1 does neither)')
  heads = hf.need('num_heads')
  vocab = hf.need('vocab_size')
  model = dict(family='encdec', vocab_size=vocab, num_layers=hf.need('num_layers'),
               num_decoder_layers=hf.get('num_decoder_layers', hf.need('num_layers')), embed_dim=hf.need('d_model'),
               num_heads=heads, num_kv_heads=heads, head_dim=hf.need('d_kv'), mlp_dim=hf.need('d_ff'),
               norm_type='rms', norm_position='pre', norm_eps=float(hf.get('layer_norm_epsilon', 1e-6)),
               mlp_activation=act, mlp_gated=gated, use_bias=False, position_type='relative',
               relative_buckets=hf.get('relative_attention_num_buckets', 32),
               relative_max_distance=hf.get('relative_attention_max_distance', 128), scale_attention=False,
               tie_embeddings=scaled, decoder_start_id=hf.get('decoder_start_token_id', hf.get('pad_token_id', 0)))
  # T5's 100 sentinels (extra_ids) where the vocabulary has room for them after 260 pieces.
  data = dict(objective='span', seq_len=512, target_len=114, add_bos=False, add_eos=True,
              num_sentinels=max(1, min(100, vocab - 260)))
  return {'model': model, 'data': data}


def _same(weights, a: str, b: str) -> bool:
  import numpy as np
  same = np.array_equal(weights.get(a), weights.get(b))
  if not same:
    weights.used.discard(a)
  return same


def mismatches(m) -> list[str]:
  out = differences(m, family='encdec', position_type='relative', norm_type='rms', norm_position='pre',
                    use_bias=False, scale_attention=False, type_vocab_size=0, num_kv_heads=m.num_heads)
  if m.mlp_gated and m.mlp_activation == 'gelu':
    out.append("model.mlp_activation='gelu' with model.mlp_gated (transformers' gated-gelu is the tanh form)")
  return out


def config_to_hf(cfg, tokenizer) -> dict:
  m = cfg.model
  act = {'gelu_tanh': 'gelu_new'}.get(m.mlp_activation, m.mlp_activation)
  proj = 'gated-gelu' if m.mlp_gated and m.mlp_activation == 'gelu_tanh' else ('gated-' if m.mlp_gated else '') + act
  return {
      'architectures': [ARCHITECTURE], 'model_type': MODEL_TYPE, 'is_encoder_decoder': True,
      'vocab_size': m.vocab_size, 'd_model': m.embed_dim, 'd_kv': m.head_dim, 'd_ff': m.mlp_dim,
      'num_layers': m.num_layers, 'num_decoder_layers': m.num_decoder_layers or m.num_layers,
      'num_heads': m.num_heads, 'relative_attention_num_buckets': m.relative_buckets,
      'relative_attention_max_distance': m.relative_max_distance, 'layer_norm_epsilon': m.norm_eps,
      'feed_forward_proj': proj, 'dropout_rate': m.dropout_rate, 'tie_word_embeddings': m.tie_embeddings,
      'scale_decoder_outputs': m.tie_embeddings, 'decoder_start_token_id': m.decoder_start_id,
      'torch_dtype': 'float32', **token_ids(tokenizer, 'pad', 'eos'),
  }


def _stack(m, side: str) -> list[Tensor]:
  stack, block = f'{side}_layers', f'{side}.block.{{i}}'
  out = [Tensor(f'{stack}_rel_bias', f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
         Tensor(f'{side}_final_norm/scale', f'{side}.final_layer_norm.weight')]
  sublayers = [('attn', 'SelfAttention')] + ([('cross_attn', 'EncDecAttention')] if side == 'decoder' else [])
  for n, (ours, hf) in enumerate(sublayers):
    norm = 'attn_norm' if ours == 'attn' else 'cross_norm'
    out.append(Tensor(f'{stack}/{norm}/scale', f'{block}.layer.{n}.layer_norm.weight'))
    for proj in ('q', 'k', 'v', 'o'):
      out.append(Tensor(f'{stack}/{ours}/{proj}', f'{block}.layer.{n}.{hf}.{proj}.weight', 'linear',
                        in_dims=2 if proj == 'o' else 1))
  n = len(sublayers)
  ff = f'{block}.layer.{n}.DenseReluDense'
  out.append(Tensor(f'{stack}/mlp_norm/scale', f'{block}.layer.{n}.layer_norm.weight'))
  if m.mlp_gated:
    out += [Tensor(f'{stack}/mlp/gate', f'{ff}.wi_0.weight', 'linear'),
            Tensor(f'{stack}/mlp/up', f'{ff}.wi_1.weight', 'linear')]
  else:
    out.append(Tensor(f'{stack}/mlp/up', f'{ff}.wi.weight', 'linear'))
  out.append(Tensor(f'{stack}/mlp/down', f'{ff}.wo.weight', 'linear'))
  return out


def table(m) -> list[Tensor]:
  out = [Tensor('embedding', 'shared.weight')] + _stack(m, 'encoder') + _stack(m, 'decoder')
  if not m.tie_embeddings:
    out.append(Tensor('unembed', 'lm_head.weight', 'linear'))
  return out
