"""Parameters <-> Hugging Face tensors, from a table of `Tensor` entries (one per parameter, per architecture).

Our parameters keep heads as their own axes ([D, N, H] for a query projection) and layers stacked on a
leading axis (`layers`, `encoder_layers`, `decoder_layers`); Hugging Face stores 2-D matrices per layer,
`nn.Linear` as [out, in] and GPT-2's `Conv1D` as [in, out], sometimes fused (GPT-2's c_attn holds q, k and v
side by side). Each entry says which of these it is; reading checks every shape against the model the
config describes and names the tensor that does not fit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from llm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tensor:
  ours: str  # '/'-separated path in the params tree; the first part is the layer stack for per-layer ones
  hf: str  # the Hugging Face name; '{i}' stands for the layer index
  kind: str = 'copy'  # copy | linear ([out, in]) | conv1d ([in, out])
  in_dims: int = 1  # linear / conv1d: how many leading axes of ours are the input side ([N, H, D] -> 2)
  part: int = 0  # this parameter is slice `part` of `parts` equal slices of the HF tensor's output axis
  parts: int = 1
  flat: bool = False  # copy: the HF tensor is 1-D where ours has axes ([N * H] vs [N, H])

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf

  def out_axis(self) -> int:
    return 0 if self.kind == 'linear' else -1


def flatten(tree, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(flatten(value, path + '/'))
    else:
      out[path] = value
  return out


def unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _from_hf(entry: Tensor, a: np.ndarray, shape: tuple[int, ...], name: str, where: str) -> np.ndarray:
  if entry.parts > 1:
    axis = entry.out_axis()
    size = a.shape[axis]
    if size % entry.parts:
      raise UserError(f'{where}: tensor {name} of shape {a.shape} does not split into {entry.parts} equal parts')
    step = size // entry.parts
    a = np.take(a, np.arange(entry.part * step, (entry.part + 1) * step), axis=axis)
  if entry.kind == 'copy':
    hf_shape = (math.prod(shape),) if entry.flat else tuple(shape)
  else:
    n_in, n_out = math.prod(shape[:entry.in_dims]), math.prod(shape[entry.in_dims:])
    hf_shape = (n_out, n_in) if entry.kind == 'linear' else (n_in, n_out)
  if tuple(a.shape) != hf_shape:
    raise UserError(f'{where}: tensor {name} has shape {tuple(a.shape)}, but config.json describes {hf_shape}')
  if entry.kind == 'linear':
    a = a.T
  return np.asarray(a, np.float32).reshape(shape)


def read_params(table: list[Tensor], weights, abstract: dict, where: str, defaults: dict | None = None) -> dict:
  """The params tree (float32 numpy) the model of `abstract` (flat path -> shape) needs, from `weights`.

  `defaults` (path -> array) fills parameters whose tensors a checkpoint may lack (BERT without its MLM head).
  """
  defaults = defaults or {}
  out = {}
  for entry in table:
    if entry.ours not in abstract:
      raise ValueError(f'conversion table names {entry.ours}, which the model does not have')
    shape = tuple(abstract[entry.ours])
    if not entry.per_layer:
      if entry.ours in defaults and not weights.has(entry.hf):
        out[entry.ours] = np.asarray(defaults[entry.ours], np.float32)
        continue
      out[entry.ours] = _from_hf(entry, weights.get(entry.hf, f' (for {entry.ours})'), shape, entry.hf, where)
      continue
    layers = []
    for i in range(shape[0]):
      name = entry.hf.format(i=i)
      layers.append(_from_hf(entry, weights.get(name, f' (config.json has {shape[0]} layers)'), shape[1:], name,
                             where))
    out[entry.ours] = np.stack(layers)
  missing = sorted(set(abstract) - set(out))
  if missing:
    raise ValueError(f'conversion table misses {missing}')
  return unflatten(out)


def _to_hf(entry: Tensor, x: np.ndarray) -> np.ndarray:
  if entry.kind == 'copy':
    return x.reshape(-1) if entry.flat else x
  matrix = x.reshape(math.prod(x.shape[:entry.in_dims]), -1)  # [in, out]
  return matrix.T if entry.kind == 'linear' else matrix


def write_tensors(table: list[Tensor], params: dict, skip: set[str] = frozenset()) -> dict[str, np.ndarray]:
  """Hugging Face name -> array for every entry (fused parts joined); entries whose `ours` is in `skip`
  (the tied output) are left out."""
  flat = flatten(params)
  pieces: dict[str, dict[int, np.ndarray]] = {}
  for entry in table:
    if entry.ours in skip:
      continue
    value = np.asarray(flat[entry.ours])
    layers = [(entry.hf.format(i=i), value[i]) for i in range(value.shape[0])] if entry.per_layer else [
        (entry.hf, value)]
    for name, x in layers:
      pieces.setdefault(name, {})[entry.part] = (_to_hf(entry, x), entry.out_axis())
  out = {}
  for name, parts in pieces.items():
    arrays = [parts[k][0] for k in sorted(parts)]
    out[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=parts[0][1])
  return out


# ---------------------------------------------------------------------------------------------------------
# config.json values

# Hugging Face activation names (transformers' ACT2FN) <-> ours. gelu_new and gelu_pytorch_tanh are both the
# tanh approximation; 'gelu' is the exact erf form.
FROM_HF_ACTIVATION = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
                      'gelu_pytorch_tanh': 'gelu_tanh', 'relu': 'relu'}
TO_HF_ACTIVATION = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu'}


# config.json keys that never change what a checkpoint computes: bookkeeping, token ids (the tokenizer's
# business), generation defaults, initialisation. Dropout settings (keys ending in _dropout, _pdrop,
# _dropout_prob, dropout_rate) act only in training and are inert too (see `inert`).
INERT = frozenset({
    'architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype', 'use_cache', '_name_or_path',
    'name_or_path', 'initializer_range', 'initializer_factor', 'bos_token_id', 'eos_token_id', 'pad_token_id',
    'sep_token_id', 'decoder_start_token_id', 'id2label', 'label2id', 'num_labels', 'problem_type',
    'finetuning_task', 'tokenizer_class', 'prefix', 'task_specific_params', 'output_attentions',
    'output_hidden_states', 'return_dict', 'torchscript', 'gradient_checkpointing', 'chunk_size_feed_forward',
    'max_length', 'min_length', 'do_sample', 'early_stopping', 'num_beams', 'temperature', 'top_k', 'top_p',
    'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size', 'num_return_sequences', 'max_new_tokens',
    'tie_encoder_decoder', 'is_encoder_decoder', 'pruned_heads', 'use_return_dict', 'attn_implementation',
    '_attn_implementation_autoset', 'cache_implementation', 'max_sequence_length'})
_DROPOUT = ('dropout', '_pdrop', 'dropout_prob', 'dropout_rate')


def inert(key: str) -> bool:
  return key in INERT or key.endswith(_DROPOUT)


class HFConfig:
  """config.json of one checkpoint: values by key, with errors that name the file, the key and the value.
  Every key looked at is remembered, so that `check_understood` can stop on one that was not."""

  def __init__(self, values: dict, where: str):
    self.values, self.where = values, where
    self.read: set[str] = set()

  def check_understood(self, architecture: str, harmless=()) -> None:
    """A config.json key that the converter never read and that is not known to leave the model alone may
    change what the checkpoint computes: the conversion stops on it rather than differ silently."""
    for key, value in self.values.items():
      if key not in self.read and key not in harmless and not inert(key):
        raise UserError(f'{self.where}: config.json {key}={value!r} is not understood by the {architecture} '
                        'converter (it may change the model); nothing was converted')

  def get(self, key: str, default=None):
    self.read.add(key)
    value = self.values.get(key)
    return default if value is None else value

  def need(self, key: str, kind=int):
    self.read.add(key)
    value = self.values.get(key)
    if value is None:
      raise UserError(f'{self.where}: config.json has no {key}')
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
      raise UserError(f'{self.where}: config.json {key}={value!r}: expected {kind.__name__}')
    return value

  def activation(self, key: str, default: str) -> str:
    name = self.get(key, default)
    if name not in FROM_HF_ACTIVATION:
      raise UserError(f'{self.where}: config.json {key}={name!r} is not supported (known: '
                      f'{", ".join(sorted(FROM_HF_ACTIVATION))})')
    return FROM_HF_ACTIVATION[name]

  def refuse(self, key: str, ok, what: str) -> None:
    """A setting llm-jax cannot reproduce: an error naming it rather than a model that computes otherwise."""
    self.read.add(key)
    value = self.values.get(key)
    if not ok(value):
      raise UserError(f'{self.where}: config.json {key}={value!r} is not supported ({what})')


def differences(model_cfg, **want) -> list[str]:
  """'model.key=value' for each key whose value is not the one an architecture needs."""
  return [f'model.{k}={model_cfg[k]!r} (needs {v!r})' for k, v in want.items() if model_cfg[k] != v]


def tied(weights, hf_cfg: HFConfig, head: str, embedding: str, default: bool = True) -> bool:
  """Whether the output layer is the embedding: config.json says so and the checkpoint has no different head
  (transformers unties them in that case too). A head equal to the embedding counts as read."""
  if not hf_cfg.get('tie_word_embeddings', default):
    return False
  if not weights.has(head):
    return True
  if np.array_equal(weights.get(head), weights.get(embedding)):
    return True
  weights.used.discard(head)  # read again as the separate output layer
  return False


def token_ids(tokenizer, *names: str) -> dict:
  """{'bos_token_id': ..., ...} of the run's tokenizer (None where it has no such piece), for config.json."""
  if tokenizer is None:
    return {}
  ids = {name: getattr(tokenizer, f'{name}_id') for name in names}
  return {f'{name}_token_id': (i if i >= 0 else None) for name, i in ids.items()}
