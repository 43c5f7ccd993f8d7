"""Mistral (MistralForCausalLM): LLaMA whose every layer attends only to the last `sliding_window` positions
(model.sliding_window; Mistral 7B v0.1 has 4096, later versions none). The window is computed exactly, at
any sequence length, in training and in cached decoding."""

from __future__ import annotations

from llm_jax.convert import llama
from llm_jax.convert.mapping import HFConfig, Tensor

MODEL_TYPE = 'mistral'
ARCHITECTURE = 'MistralForCausalLM'
OPTIONAL_PREFIX = ''
IGNORE = llama.IGNORE
HARMLESS = ()


def config_from_hf(hf: HFConfig, weights) -> dict:
  return llama.decoder_from_hf(hf, weights, sliding_window=int(hf.get('sliding_window', 0)))


def mismatches(m) -> list[str]:
  out = llama.decoder_mismatches(m, {}, use_bias=False)
  return [d for d in out if not d.startswith('model.sliding_window=')]  # any window, on every layer


def config_to_hf(cfg, tokenizer) -> dict:
  return {**llama.decoder_config_to_hf(cfg, tokenizer, ARCHITECTURE, MODEL_TYPE),
          'sliding_window': cfg.model.sliding_window or None}


def table(m) -> list[Tensor]:
  return llama.decoder_table(m)
