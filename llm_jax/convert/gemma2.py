"""Gemma 2 (Gemma2ForCausalLM): a LLaMA-like decoder with norm gains stored as w - 1 (model.norm_offset),
embeddings scaled by sqrt(d) (embed_scale), a GeGLU MLP (gelu_tanh), attention logits scaled by
query_pre_attn_scalar (query_scale) and soft-capped (attn_logit_softcap), the output logits soft-capped
(final_logit_softcap), local sliding-window layers alternating with global ones (sliding_window,
global_every), and four norms per layer: before and after each sublayer (post_norms)."""

from __future__ import annotations

from llm_jax.convert import llama
from llm_jax.convert.mapping import HFConfig, Tensor
from llm_jax.errors import UserError

MODEL_TYPE = 'gemma2'
ARCHITECTURE = 'Gemma2ForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = llama.IGNORE
# hidden_act: Gemma 1's name of the activation, written beside hidden_activation by older exports and
# ignored by transformers' Gemma 2.
HARMLESS = ('hidden_act',)
LAYOUT = dict(norm_offset=True, embed_scale=True, post_norms=True)
_FREE = ('sliding_window', 'global_every', 'query_scale', 'attn_logit_softcap', 'final_logit_softcap')
_LOCAL, _GLOBAL = 'sliding_attention', 'full_attention'


def _windows(hf: HFConfig, layers: int) -> tuple[int, int]:
  """(sliding_window, global_every) from layer_types (by default local first, then alternating)."""
  types = hf.get('layer_types') or [_LOCAL if (i + 1) % 2 else _GLOBAL for i in range(layers)]
  local = [t == _LOCAL for t in types]
  if len(types) != layers or set(types) - {_LOCAL, _GLOBAL}:
    raise UserError(f'{hf.where}: config.json layer_types={types!r} is not one {_LOCAL!r} or {_GLOBAL!r} per layer')
  if not any(local):
    hf.get('sliding_window')
    return 0, 0
  for every in [0] + list(range(2, layers + 1)):
    if [not (every and (i + 1) % every == 0) for i in range(layers)] == local:
      return hf.need('sliding_window'), every
  raise UserError(f'{hf.where}: config.json layer_types={types!r} is not supported (llm-jax has local layers with '
                  'every n-th one global)')


def config_from_hf(hf: HFConfig, weights) -> dict:
  hf.refuse('attention_bias', lambda v: not v, 'Gemma 2 without attention biases')
  hf.refuse('use_bidirectional_attention', lambda v: not v, 'causal attention')
  window, every = _windows(hf, hf.need('num_hidden_layers'))
  scalar = hf.get('query_pre_attn_scalar', 0)
  if scalar != int(scalar) or scalar < 0:
    raise UserError(f'{hf.where}: config.json query_pre_attn_scalar={scalar!r} is not supported (a whole number)')
  return llama.decoder_from_hf(
      hf, weights, act_key='hidden_activation', tie_default=True, sliding_window=window, global_every=every,
      query_scale=int(scalar), attn_logit_softcap=float(hf.get('attn_logit_softcapping', 0.0)),
      final_logit_softcap=float(hf.get('final_logit_softcapping', 0.0)), **LAYOUT)


def mismatches(m) -> list[str]:
  out = llama.decoder_mismatches(m, LAYOUT, use_bias=False)
  return [d for d in out if not d.startswith(tuple(f'model.{k}=' for k in _FREE))]


def config_to_hf(cfg, tokenizer) -> dict:
  from llm_jax.models.transformer import layer_windows
  m = cfg.model
  out = llama.decoder_config_to_hf(cfg, tokenizer, ARCHITECTURE, MODEL_TYPE, act_key='hidden_activation')
  if m.mlp_activation == 'gelu_tanh':
    out['hidden_activation'] = 'gelu_pytorch_tanh'  # Gemma's own name of the same function
  return {**out, 'attention_bias': False, 'query_pre_attn_scalar': m.query_scale or m.head_dim,
          'attn_logit_softcapping': m.attn_logit_softcap or None,
          'final_logit_softcapping': m.final_logit_softcap or None, 'sliding_window': m.sliding_window or None,
          'layer_types': [_LOCAL if w else _GLOBAL for w in layer_windows(m, m.num_layers)]}


def table(m) -> list[Tensor]:
  return llama.decoder_table(m, norms=(('attn_norm', 'input_layernorm'), ('attn_post_norm', 'post_attention_layernorm'),
                                       ('mlp_norm', 'pre_feedforward_layernorm'),
                                       ('mlp_post_norm', 'post_feedforward_layernorm')))
