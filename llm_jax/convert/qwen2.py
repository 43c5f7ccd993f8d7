"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): LLaMA with biases on the query, key and value projections
(model.qkv_bias). Their configs name a sliding window that the released models leave off; one that is on is
refused."""

from __future__ import annotations

from llm_jax.convert import llama
from llm_jax.convert.mapping import HFConfig, Tensor

MODEL_TYPE = 'qwen2'
ARCHITECTURE = 'Qwen2ForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = llama.IGNORE
HARMLESS = ()
LAYOUT = dict(qkv_bias=True)


def config_from_hf(hf: HFConfig, weights) -> dict:
  llama.full_attention_only(hf)
  return llama.decoder_from_hf(hf, weights, add_bos=False, **LAYOUT)  # Qwen's tokenizer adds no BOS


def mismatches(m) -> list[str]:
  return llama.decoder_mismatches(m, LAYOUT, use_bias=False)


def config_to_hf(cfg, tokenizer) -> dict:
  return {**llama.decoder_config_to_hf(cfg, tokenizer, ARCHITECTURE, MODEL_TYPE), 'use_sliding_window': False,
          'layer_types': ['full_attention'] * cfg.model.num_layers}


def table(m) -> list[Tensor]:
  return llama.decoder_table(m)
