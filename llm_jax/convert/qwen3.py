"""Qwen3 (Qwen3ForCausalLM): LLaMA with an RMSNorm over each head's queries and keys before rotary positions
(model.qk_norm). Biases on its attention (attention_bias) are refused: the released models have none."""

from __future__ import annotations

from llm_jax.convert import llama
from llm_jax.convert.mapping import HFConfig, Tensor

MODEL_TYPE = 'qwen3'
ARCHITECTURE = 'Qwen3ForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = llama.IGNORE
HARMLESS = ()
LAYOUT = dict(qk_norm=True)


def config_from_hf(hf: HFConfig, weights) -> dict:
  llama.full_attention_only(hf)
  hf.refuse('attention_bias', lambda v: not v, 'Qwen3 without attention biases')
  return llama.decoder_from_hf(hf, weights, add_bos=False, **LAYOUT)


def mismatches(m) -> list[str]:
  return llama.decoder_mismatches(m, LAYOUT, use_bias=False)


def config_to_hf(cfg, tokenizer) -> dict:
  return {**llama.decoder_config_to_hf(cfg, tokenizer, ARCHITECTURE, MODEL_TYPE), 'attention_bias': False,
          'use_sliding_window': False, 'layer_types': ['full_attention'] * cfg.model.num_layers}


def table(m) -> list[Tensor]:
  return llama.decoder_table(m)
