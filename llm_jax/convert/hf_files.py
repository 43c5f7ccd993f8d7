"""A Hugging Face model directory on disk: `config.json`, weights as safetensors (one file, or shards named
by `model.safetensors.index.json`); its tokenizer files are tokenizer_files.py's. Read and written with the
`safetensors` package's numpy API: no torch.

The reader opens the files lazily (names and shapes first, a tensor's data when asked for), remembers which
tensors were used, and names what is missing, so a config that does not match its weights is reported as
the tensor it concerns.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import numpy as np

from llm_jax import storage
from llm_jax.errors import UserError

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


def read_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise UserError(f'{hf_dir} is not a directory')
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.exists(path):
    raise UserError(f'{hf_dir} has no {CONFIG} (not a Hugging Face model directory?)')
  return storage.read_json(path)


class Weights:
  """The tensors of a checkpoint, by name. `optional_prefix`: checkpoints of the bare model (GPT2Model,
  BertModel) name tensors without the prefix the head model (GPT2LMHeadModel, BertForMaskedLM) puts on them;
  both spellings are found under the head model's names."""

  def __init__(self, hf_dir: str, optional_prefix: str = ''):
    from safetensors import safe_open
    self._dir = hf_dir
    index = os.path.join(hf_dir, INDEX)
    single = os.path.join(hf_dir, WEIGHTS)
    if os.path.isfile(index):
      try:
        with open(index, encoding='utf-8') as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'{index} is not a safetensors index ({type(e).__name__}: {e})') from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = [WEIGHTS]
    else:
      bins = [n for n in os.listdir(hf_dir) if n.endswith(('.bin', '.pt', '.pth', '.h5', '.msgpack'))]
      extra = f' (it has {", ".join(sorted(bins))}: save the model with safe_serialization=True)' if bins else ''
      raise UserError(f'{hf_dir} has no {WEIGHTS} or {INDEX}{extra}')
    self._handles = {}
    self._where: dict[str, str] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      try:
        handle = safe_open(path, framework='numpy')
      except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e})') from None
      self._handles[name] = handle
      for key in handle.keys():
        self._where[key] = name
    self._prefix = optional_prefix
    self.used: set[str] = set()

  def _resolve(self, name: str) -> str | None:
    if name in self._where:
      return name
    if self._prefix and name.startswith(self._prefix) and name[len(self._prefix):] in self._where:
      return name[len(self._prefix):]
    return None

  def has(self, name: str) -> bool:
    return self._resolve(name) is not None

  def get(self, name: str, why: str = '') -> np.ndarray:
    key = self._resolve(name)
    if key is None:
      raise UserError(f'{self._dir}: the weights have no tensor {name}{why}')
    self.used.add(key)
    return self._handles[self._where[key]].get_tensor(key)

  def unused(self, ignore: Iterable[str]) -> list[str]:
    patterns = [re.compile(p) for p in ignore]
    return sorted(k for k in self._where if k not in self.used and not any(p.search(k) for p in patterns))


def write(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """config.json and model.safetensors (transformers wants the 'format' metadata to say 'pt')."""
  from safetensors.numpy import save_file
  with open(os.path.join(out_dir, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS),
            metadata={'format': 'pt'})
