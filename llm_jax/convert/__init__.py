"""Hugging Face <-> llm-jax: `from_hf` turns a transformers checkpoint directory (config.json + safetensors) of
LLaMA (1-3.x), Qwen2/2.5, Qwen3, Mistral, Gemma 2, GPT-2, BERT or T5 into an llm-jax work directory; `to_hf`
writes a run's latest params as a directory that transformers' `from_pretrained` loads. No torch: tensors go
through safetensors' numpy API.

An imported work directory is a normal run: config.json (the model the HF config describes, data settings
for its family, plus any --config overrides), the checkpoint's tokenizer (tokenizer_files.py: LLaMA's
tokenizer.model, T5's spiece.model, or tokenizer.json with its tokenizer_config.json), and a checkpoint at
step 0 holding the params alone, which `eval` and `generate` read and `train` starts from. Either direction
writes into a temporary directory beside the output and renames it into place at the end: a failure leaves
nothing behind.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from llm_jax import atomic, config as config_lib
from llm_jax.convert import bert, gemma2, gpt2, hf_files, llama, mistral, qwen2, qwen3, t5, tokenizer_files
from llm_jax.convert.mapping import HFConfig, flatten, read_params, write_tensors
from llm_jax.errors import UserError
from llm_jax.run.params import from_layout, to_layout  # noqa: F401 (convert.to_layout: the tests' name)

# In the order `to_hf` tries them: a model that fits LLaMA is written as LLaMA.
ARCHITECTURES = {a.MODEL_TYPE: a for a in (llama, gpt2, bert, t5, qwen2, qwen3, mistral, gemma2)}
_BY_CLASS = {a.ARCHITECTURE: a for a in ARCHITECTURES.values()}
_BY_CLASS.update(GPT2Model=gpt2, BertModel=bert, BertForPreTraining=bert, LlamaModel=llama)


def architecture_of(hf: HFConfig):
  model_type = hf.get('model_type', '')
  classes = hf.get('architectures', []) or []
  if model_type in ARCHITECTURES:
    return ARCHITECTURES[model_type]
  for name in classes:
    if name in _BY_CLASS:
      return _BY_CLASS[name]
  named = ', '.join(f'{c}' for c in classes) or 'none named'
  raise UserError(f'{hf.where}: architecture {named} (model_type {model_type!r}) is not supported; llm-jax '
                  f'converts {", ".join(a.ARCHITECTURE for a in ARCHITECTURES.values())}')


def _scanned(model_cfg) -> ml_collections.FrozenConfigDict:
  """The conversion tables name the scanned layout (layers stacked on a leading axis)."""
  d = model_cfg.to_dict()
  d['scan_layers'] = True
  return ml_collections.FrozenConfigDict(d)


def _abstract(model_cfg) -> dict:
  from llm_jax.models import build_model
  from llm_jax.train.state import init_params
  model = build_model(_scanned(model_cfg))
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  return {path: s.shape for path, s in flatten(shapes).items()}


def check_output(output: str) -> None:
  """The output must be new or an empty directory: nothing is overwritten. Checked before any weights are
  read, and again when writing."""
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise UserError(f'--output={output} exists and is not empty; choose a new directory')
  existing = os.path.dirname(output)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'--output={output}: {existing} is not a directory')


def from_hf(hf_dir: str, output: str, overrides=(), say=print) -> dict:
  """Convert the checkpoint in `hf_dir` into a new work directory `output`; returns a summary."""
  hf = HFConfig(hf_files.read_config(hf_dir), hf_dir)
  arch = architecture_of(hf)
  weights = hf_files.Weights(hf_dir, arch.OPTIONAL_PREFIX)
  sections = arch.config_from_hf(hf, weights)
  hf.check_understood(arch.ARCHITECTURE, arch.HARMLESS)
  cfg = config_lib.default_config()
  for section, values in sections.items():
    for key, value in _flat_items(values):
      *parents, leaf = key.split('.')
      node = cfg[section]
      for p in parents:
        node = node[p]
      try:
        node[leaf] = value
      except TypeError:  # ml_collections keeps each key's type
        raise UserError(f'{hf_dir}: config.json gives {section}.{key} the value {value!r}, '
                        f'expected {type(node[leaf]).__name__}') from None
  cfg = config_lib.load(None, overrides, base=cfg)

  from llm_jax.run import workdir as workdir_lib
  tok = tokenizer_files.from_checkpoint(hf_dir)
  if tok is not None:
    workdir_lib.check_vocab(tok, cfg)

  m = cfg.model
  defaults = bert.head_defaults(m, weights.has('cls.predictions.bias')) if arch is bert else {}
  params = read_params(arch.table(m), weights, _abstract(m), hf_dir, defaults)
  unexpected = weights.unused(arch.IGNORE)
  if unexpected:
    more = f' and {len(unexpected) - 3} more' if len(unexpected) > 3 else ''
    raise UserError(f'{hf_dir}: the weights hold {", ".join(unexpected[:3])}{more}, which config.json does not '
                    f'describe ({arch.MODEL_TYPE}, {m.num_layers} layers)')
  left_out = weights.unused(())
  if defaults:
    say('the checkpoint has no masked-LM head: it starts from an initialisation (train it before relying on '
        "the model's predictions; its hidden states are the checkpoint's)")
  if [n for n in left_out if 'pooler' in n]:
    say("left out the next-sentence pooler (pooler.*): llm-jax's encoder has no use for it")

  from llm_jax.retrieval import embeddings  # sentence-transformers' pooling files travel with the weights
  _write_workdir(output, cfg, params, tok, embeddings.st_files(hf_dir))
  return {'architecture': arch.ARCHITECTURE, 'output': output, 'tokenizer': tokenizer_files.describe(tok),
          'params': int(sum(np.size(a) for a in jax.tree.leaves(params)))}


def _flat_items(values: dict, prefix: str = ''):
  """('key', value) of a config section, nested dicts (model.rope_scaling) as 'key.sub'."""
  for key, value in values.items():
    if isinstance(value, dict):
      yield from _flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _write_workdir(output: str, cfg, params: dict, tok, extra_files=None) -> None:
  from llm_jax import sharding
  from llm_jax.run import writer
  from llm_jax.models import build_model
  from llm_jax.train.state import abstract_params
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  targets = abstract_params(build_model(cfg.model), mesh, rules)
  params = to_layout(params, cfg.model.scan_layers)
  dtype = jax.numpy.dtype(cfg.model.param_dtype)
  on_mesh = jax.tree.map(lambda a, t: jax.device_put(np.asarray(a, dtype), t.sharding), params, targets)
  check_output(output)
  writer.write_run(output, cfg, on_mesh, 0, tok, extra_files)


def to_hf(workdir: str, output: str) -> dict:
  """Write the latest params of the run in `workdir` as a Hugging Face directory `output`."""
  from llm_jax import sharding
  from llm_jax.run import params as params_lib, workdir as workdir_lib
  from llm_jax.data import tokenizer as tokenizer_lib
  cfg = workdir_lib.load_config(workdir)
  reasons = {a.ARCHITECTURE: a.mismatches(cfg.model) for a in ARCHITECTURES.values()}
  arch = next((ARCHITECTURES[a.MODEL_TYPE] for a in ARCHITECTURES.values() if not reasons[a.ARCHITECTURE]), None)
  if arch is None:
    closest = min(reasons, key=lambda a: len(reasons[a]))
    raise UserError(f'{workdir}: this model has no Hugging Face architecture llm-jax writes; closest is {closest}, '
                    f'which differs in {", ".join(reasons[closest])}')
  tok_path = workdir_lib.tokenizer_path(workdir)
  tok = tokenizer_lib.load(tok_path) if tok_path else None

  # Read on this machine's devices whatever mesh the run trained on.
  mesh_cfg = ml_collections.ConfigDict(cfg.mesh.to_dict())
  mesh_cfg.update(data=-1, fsdp=1, sequence=1, tensor=1, dcn_data=1, dcn_fsdp=1)
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.rules_from_config(mesh_cfg)
  # The newest step that reads (a damaged one is passed over with a warning); a LoRA run's adapters folded in.
  step, params = params_lib.restore(workdir, mesh, rules, cfg, merge_lora=True)
  params = from_layout(jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params), np.stack)
  m = cfg.model
  tensors = write_tensors(arch.table(m), params)
  if arch is bert:
    tensors.update(bert.extra_tensors(m, params))
  config = arch.config_to_hf(cfg, tok)
  check_output(output)
  try:
    with atomic.new_directory(output) as tmp:
      hf_files.write(tmp, config, tensors)
      if tok is not None:
        tokenizer_files.write(tmp, tokenizer_files.export_files(tok, arch.MODEL_TYPE))
  except OSError as e:
    raise UserError(f'cannot write --output={output}: {e.strerror or e}') from None
  return {'architecture': arch.ARCHITECTURE, 'output': output, 'step': step, 'tensors': len(tensors)}


__all__ = ['ARCHITECTURES', 'from_hf', 'to_hf']
