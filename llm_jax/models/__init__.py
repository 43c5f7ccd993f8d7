"""Model families, built from the `model` section of the config: `decoder` (LLaMA, GPT-2), `encoder` (BERT),
`encdec` (T5).

A batch (data/pipeline.py) holds [B, T] arrays: `inputs`, `targets`, `loss_mask`, `segment_ids`,
`positions`, and for the encoder-decoder also the decoder's `decoder_inputs`, `decoder_segment_ids`,
`decoder_positions` (then `targets` and `loss_mask` are the decoder's). `model_args` picks out what a
family's `__call__` takes, so training, evaluation and initialisation handle every family the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from llm_jax.models.decoder import Decoder, init_cache
from llm_jax.models.encdec import EncoderDecoder
from llm_jax.models.encoder import Encoder
from llm_jax.models.transformer import CACHE_AXES

__all__ = ['CACHE_AXES', 'build_model', 'example_batch', 'init_cache', 'model_args']

_FAMILIES = {'decoder': Decoder, 'encoder': Encoder, 'encdec': EncoderDecoder}


def frozen(model_cfg) -> ml_collections.FrozenConfigDict:
  """Flax modules keep their config as a hashable attribute, so it must be frozen."""
  if isinstance(model_cfg, ml_collections.FrozenConfigDict):
    return model_cfg
  return ml_collections.FrozenConfigDict(model_cfg)


def build_model(model_cfg, deterministic: bool = True):
  cfg = frozen(model_cfg)
  if cfg.family not in _FAMILIES:
    raise ValueError(f'unknown model family {cfg.family!r}')  # config validation rejects this earlier
  return _FAMILIES[cfg.family](cfg, deterministic=deterministic)


def model_args(model_cfg, batch) -> tuple:
  """The arrays of `batch` that the family's model is called with, in order."""
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  if model_cfg.family == 'encdec':
    args += (batch['decoder_inputs'], batch['decoder_positions'], batch['decoder_segment_ids'])
  return args


def example_batch(model_cfg, rows: int = 1, length: int = 8) -> dict:
  """A batch of the family's shapes (one document per row), for initialisation and shape inference."""
  tokens = jnp.zeros((rows, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  batch = {'inputs': tokens, 'targets': tokens, 'loss_mask': jnp.ones_like(tokens), 'positions': positions,
           'segment_ids': jnp.ones_like(tokens)}
  if model_cfg.family == 'encdec':
    batch.update(decoder_inputs=tokens, decoder_positions=positions, decoder_segment_ids=jnp.ones_like(tokens))
  return batch
