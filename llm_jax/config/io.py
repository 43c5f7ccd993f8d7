"""The resolved config of a run as JSON: saved in its workdir, read back by eval, generate and resume."""

from __future__ import annotations

import json
from typing import Sequence

import ml_collections

from llm_jax.config.load import check_schema, fill_defaults
from llm_jax.config.schema import default_config
from llm_jax.config.validate import validate
from llm_jax import atomic, storage


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str) -> ml_collections.ConfigDict:
  data = storage.read_json(path, dict, 'object of config sections')
  partial = ml_collections.ConfigDict(data)
  check_schema(partial, default_config(), where=path)
  cfg = fill_defaults(partial)
  validate(cfg)
  cfg.lock()
  return cfg


def write_json_atomic(cfg: ml_collections.ConfigDict, path: str) -> None:
  atomic.write_text(path, to_json(cfg) + '\n')


def model_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                      ignore: Sequence[str] = ()) -> list[str]:
  """Keys of `model` that differ: a checkpoint of one cannot be restored into the other."""
  return [f'model.{k}' for k in a.model.keys() if k not in ignore and a.model[k] != b.model[k]]
