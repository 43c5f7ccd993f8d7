"""Model families, built from the `model` section of the config: `decoder` (LLaMA, GPT-2), `encoder` (BERT),
`encdec` (T5).

A batch (data/pipeline.py) holds [B, T] arrays: `inputs`, `targets`, `loss_mask`, `segment_ids`,
`positions`, and for the encoder-decoder also the decoder's `decoder_inputs`, `decoder_segment_ids`,
`decoder_positions` (then `targets` and `loss_mask` are the decoder's). `model_args` picks out what a
family's `__call__` takes, so training, evaluation and initialisation handle every family the same way.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from llm_jax.models.decoder import Decoder, init_cache
from llm_jax.models.encdec import EncoderDecoder
from llm_jax.models.encoder import Encoder
from llm_jax.models.transformer import CACHE_AXES, cache_axes, cache_rows_axis

__all__ = ['CACHE_AXES', 'FAMILIES', 'Family', 'build_model', 'cache_axes', 'cache_rows_axis', 'example_batch',
           'family_of', 'init_cache', 'model_args', 'require_family']


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family as the rest of the system sees it. Code asks these fields; it never compares names.

  two_stacks: an encoder and a decoder, each with its own rows (the batch's `decoder_*` arrays, data.target_len);
  generates: decodes text (infer/decode.py has an adapter for it), else `cannot_generate` says why not;
  causal: one causal stack whose next-token log-likelihoods score any continuation (tasks, the server);
  embeds: its hidden states pooled are sentence embeddings (retrieval/embeddings.py);
  lora: LoRA adapters are wired into its projections; decoder_layouts: the layout keys of Llama 3, Qwen,
  Mistral and Gemma (model.qkv_bias, qk_norm, sliding_window, soft-caps, norm_offset...) apply; output_bias: its output layer has a bias with
  model.use_bias (BERT's masked-LM head).
  """
  name: str
  module: type
  two_stacks: bool = False
  generates: bool = True
  causal: bool = False
  embeds: bool = False
  cannot_generate: str = ''
  lora: bool = False
  decoder_layouts: bool = False
  output_bias: bool = False


FAMILIES = {f.name: f for f in (
    Family('decoder', Decoder, causal=True, lora=True, decoder_layouts=True),
    Family('encoder', Encoder, generates=False, embeds=True, output_bias=True,
           cannot_generate='a masked-LM encoder does not generate text; `llm-jax eval` reports its masked-token '
                           'loss and accuracy'),
    Family('encdec', EncoderDecoder, two_stacks=True),
)}


def family_of(model_cfg) -> Family:
  """The registry record of `model.family` (validated at load, so it exists)."""
  return FAMILIES[model_cfg.family]


def frozen(model_cfg) -> ml_collections.FrozenConfigDict:
  """Flax modules keep their config as a hashable attribute, so it must be frozen."""
  if isinstance(model_cfg, ml_collections.FrozenConfigDict):
    return model_cfg
  return ml_collections.FrozenConfigDict(model_cfg)


def build_model(model_cfg, deterministic: bool = True):
  cfg = frozen(model_cfg)
  return family_of(cfg).module(cfg, deterministic=deterministic)


def model_args(model_cfg, batch) -> tuple:
  """The arrays of `batch` that the family's model is called with, in order."""
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  if family_of(model_cfg).two_stacks:
    args += (batch['decoder_inputs'], batch['decoder_positions'], batch['decoder_segment_ids'])
  return args


def example_batch(model_cfg, rows: int = 1, length: int = 8) -> dict:
  """A batch of the family's shapes (one document per row), for initialisation and shape inference."""
  tokens = jnp.zeros((rows, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  batch = {'inputs': tokens, 'targets': tokens, 'loss_mask': jnp.ones_like(tokens), 'positions': positions,
           'segment_ids': jnp.ones_like(tokens)}
  if family_of(model_cfg).two_stacks:
    batch.update(decoder_inputs=tokens, decoder_positions=positions, decoder_segment_ids=jnp.ones_like(tokens))
  return batch


def require_family(cfg, command: str, can: str, why: str = '') -> None:
  """A one-line error when the run's model family lacks the capability `can` (a Family field such as
  'generates', 'causal' or 'embeds') that `command` needs."""
  from llm_jax.errors import UserError
  family = family_of(cfg.model)
  if getattr(family, can):
    return
  if not why and can == 'generates':
    why = family.cannot_generate
  why = why or f'{command} is for model.family {" or ".join(repr(f.name) for f in FAMILIES.values() if getattr(f, can))}'
  raise UserError(f'{command}: this run has model.family={family.name!r}: {why}')
