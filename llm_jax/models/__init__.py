"""Model families, built from the `model` section of the config."""

from __future__ import annotations

import ml_collections

from llm_jax.models.decoder import CACHE_AXES, Decoder, init_cache

__all__ = ['CACHE_AXES', 'build_model', 'init_cache']


def frozen(model_cfg) -> ml_collections.FrozenConfigDict:
  """Flax modules keep their config as a hashable attribute, so it must be frozen."""
  if isinstance(model_cfg, ml_collections.FrozenConfigDict):
    return model_cfg
  return ml_collections.FrozenConfigDict(model_cfg)


def build_model(model_cfg, deterministic: bool = True):
  cfg = frozen(model_cfg)
  if cfg.family == 'decoder':
    return Decoder(cfg, deterministic=deterministic)
  raise ValueError(f'unknown model family {cfg.family!r}')  # config validation rejects this earlier
