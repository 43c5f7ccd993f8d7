"""Configs: the schema with defaults, loading recipe files, command-line overrides, validation, JSON.

`default_config()` is the schema: every key the project reads exists here with a default of the right type.
Recipes under `configs/` start from it and change values, never add keys, so an override or a saved
`config.json` can always be checked key by key against it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from llm_jax.errors import UserError

# The mesh axes, from the least to the most communication per step: a data-parallel replica exchanges
# gradients once per step, FSDP gathers weights once per layer, context parallelism gathers keys and values
# once per layer, tensor parallelism reduces activations twice per layer. jax.make_mesh gives the last axes
# the fastest links, so `tensor` goes last.
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')

# Every logical axis name the models use (see models/layers.py). `kv_seq` is the key length of attention,
# which context parallelism gathers whole while queries stay split over `sequence`.
# `table` is the rows of small lookup tables (learned positions, token types, T5's relative-position buckets),
# never split.
LOGICAL_AXES = ('batch', 'seq', 'kv_seq', 'cache_seq', 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
                'layers', 'table')

# Logical axis -> mesh axes, in priority order (flax semantics: a mesh axis is used at most once per array,
# so `batch` claims ('data', 'fsdp') for activations before `embed` could claim 'fsdp'; parameters, which
# have no batch axis, get `embed` sharded over 'fsdp', which is what makes FSDP). Parameters are also split
# over `sequence`, which would otherwise hold whole copies: context parallelism doubles as FSDP for weights.
_REPLICATED = tuple((name, None) for name in ('kv_seq', 'cache_seq', 'head_dim', 'layers', 'table'))
RULE_PRESETS = {
    # Pure data parallelism: every device holds every weight; rows split over data and fsdp alike.
    'dp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', None), ('embed', None), ('heads', None),
           ('kv_heads', None), ('mlp', None)) + _REPLICATED,
    # ZeRO-3 / FSDP: weights, gradients and optimizer state split along `embed`, gathered per layer.
    'fsdp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', None), ('embed', ('fsdp', 'sequence')),
             ('heads', None), ('kv_heads', None), ('mlp', None)) + _REPLICATED,
    # FSDP plus Megatron-style tensor parallelism of heads, MLP and vocabulary over `tensor`.
    'fsdp_tp': (('batch', ('data', 'fsdp')), ('seq', 'sequence'), ('vocab', 'tensor'),
                ('embed', ('fsdp', 'sequence')), ('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'))
               + _REPLICATED,
}


def default_config() -> ml_collections.ConfigDict:
  """Every key llm-jax reads, with its default. Recipes override values from here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Fine-tuning: a pretrained workdir whose latest params start this run (step 0, new optimizer state, its
  # tokenizer); '' trains from scratch. Its model must match this one (model.vocab_size may grow to fit the
  # chat template's role markers; see finetune.py).
  c.init_from = ''

  c.model = ml_collections.ConfigDict()
  m = c.model
  # decoder (LLaMA, GPT-2) | encoder (BERT, masked LM) | encdec (T5, span corruption). The keys below
  # describe any of them; models/ reads them, the recipes in configs/ set them per family.
  m.family = 'decoder'
  m.vocab_size = 4096  # the tokenizer is trained to this less the ids the objective reserves (mask, sentinels)
  m.num_layers = 4  # encdec: of the encoder
  m.num_decoder_layers = 0  # encdec: of the decoder (0: num_layers)
  m.embed_dim = 256
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 64
  m.mlp_dim = 704
  m.norm_type = 'rms'  # rms (LLaMA, T5) | layer (GPT-2, BERT: mean removed, plus a bias with use_bias)
  m.norm_position = 'pre'  # pre: norm the input of each sublayer | post (BERT): norm after each residual add
  m.norm_eps = 1e-5
  m.mlp_activation = 'silu'  # silu | gelu (exact erf) | gelu_tanh (GPT-2's "gelu_new") | relu
  m.mlp_gated = True  # act(x W_gate) * (x W_up) (SwiGLU, GEGLU), else act(x W_up)
  m.use_bias = False  # biases on every projection and layer norm (GPT-2, BERT)
  m.position_type = 'rope'  # rope | learned (a table added to the embeddings) | relative (T5's buckets)
  m.rope_theta = 10000.0
  m.max_positions = 1024  # learned: rows of the position table, at least data.seq_len
  m.relative_buckets = 32  # relative: buckets of the per-head bias (half per direction when bidirectional)
  m.relative_max_distance = 128  # relative: distances from here on share the last bucket
  m.scale_attention = True  # logits / sqrt(head_dim); T5 folds that into its initialisation instead
  m.type_vocab_size = 0  # encoder: BERT's token-type table (type 0 is used; kept for checkpoint round trips)
  m.decoder_start_id = 0  # encdec: the first decoder input of every target (T5 starts from pad, 0)
  m.tie_embeddings = False  # encdec: T5's rule, a tied output layer sees hidden states * embed_dim ** -0.5
  m.init_std = 0.02
  m.dropout_rate = 0.0
  # Precision: 'auto' computes in bfloat16 on GPU/TPU and float32 on CPU (where bfloat16 matmuls are slower).
  m.dtype = 'auto'  # compute dtype of activations and matmuls: auto | float32 | bfloat16 | float16
  m.param_dtype = 'float32'  # master weights (what the optimizer updates and checkpoints hold)
  m.logits_dtype = 'float32'  # dtype of the output logits; the loss upcasts to float32 either way
  m.scan_layers = True
  # Attention kernel (models/layers.py:attend): auto takes cuDNN's flash attention on CUDA GPUs where it applies
  # (bfloat16/float16, head_dim a multiple of 8 up to 128, no T5 bias, no context parallelism), else XLA.
  m.attention_impl = 'auto'  # auto | xla | cudnn
  m.remat = 'none'  # none | full | dots_no_batch | save_attention (see models/decoder.py)
  # LoRA (Hu et al. 2021): low-rank adapters x A B * alpha / rank on the named projections; with rank > 0
  # only the adapters train (needs init_from) and checkpoints hold only them (see lora.py).
  m.lora = ml_collections.ConfigDict()
  m.lora.rank = 0  # 0: off
  m.lora.alpha = 16.0
  m.lora.targets = ('q', 'v')  # of q k v o (attention) and gate up down (MLP)

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = 'builtin'  # 'builtin', a glob of .txt/.jsonl(.gz) files, or 'tfds:NAME' / 'tfds:DIR'
  d.mixture = ()  # ((source, weight), ...): when set, these sources mixed by weight replace data.source
  d.text_field = 'text'  # the field read from .jsonl records and TFDS examples
  d.txt_mode = 'file'  # .txt files: 'file' (one document each) or 'blocks' (split at blank lines)
  d.max_doc_chars = 1_000_000  # longer documents are cut into pieces of this size (bytes for .txt)
  d.tfds_data_dir = ''  # where tfds:NAME datasets are prepared; '' is tfds' default
  d.tfds_train_split = 'train'
  d.tfds_heldout_split = ''  # '' takes the first of heldout / validation / test the dataset has
  d.shards = 8  # logical data shards: fixed for a run, a multiple of the process count, divides batch_size
  d.workers = 0  # worker processes that read and tokenize (0: in the training process)
  d.prefetch = 64  # documents read ahead per shard
  d.heldout_percent = 5  # share of documents held out, chosen by a hash of their name
  d.tokenizer = ''  # a sentencepiece .model, a tokenizer.json or a directory; '' trains a sentencepiece one
  d.tokenizer_train_chars = 20_000_000  # text the tokenizer is trained on, at most
  d.seq_len = 256
  d.batch_size = 16  # global, over all processes
  d.add_bos = True
  d.add_eos = True
  # The objective turns each document into features before packing (data/objectives.py); it must fit
  # model.family: causal <-> decoder, mlm <-> encoder, span <-> encdec.
  d.objective = 'causal'  # causal | mlm | span
  d.mask_rate = 0.15  # mlm: share of each document's tokens that are predicted
  d.mask_random_rate = 0.1  # mlm: of the predicted tokens, share replaced by a random token
  d.mask_keep_rate = 0.1  # mlm: ... and share left as they are; the rest become the mask token
  d.whole_word_masking = False  # mlm: choose whole words (all their pieces) instead of single tokens
  d.noise_density = 0.15  # span: share of tokens replaced by sentinels in the input, predicted as targets
  d.mean_span_length = 3.0  # span: mean length of a corrupted span
  d.num_sentinels = 100  # span: sentinel ids reserved after the tokenizer's pieces (T5's extra_ids)
  d.target_len = 64  # span: decoder row length (data.seq_len is the encoder's)
  # sft / dpo: the chat template. Each message is <|role|> content <|end|>; the markers are ids appended
  # after the tokenizer's pieces (one per role, then <|end|>). The last role is the model's own voice: the
  # only one trained on and the one `llm-jax chat` generates; {prompt, response} records are the last two.
  d.chat_roles = ('system', 'user', 'assistant')
  d.dpo_beta = 0.1  # dpo: the strength of the KL tie to the reference model (Rafailov et al. 2023)

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.steps = 1000
  t.optimizer = 'adamw'  # adamw | adafactor | lion (see train/optim.py)
  t.learning_rate = 3e-3  # peak
  t.schedule = 'cosine'  # after linear warmup: cosine | linear | constant | rsqrt | wsd
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # cosine, linear and wsd decay to learning_rate * min_lr_ratio
  t.decay_fraction = 0.2  # wsd: the share of all steps spent in the final decay
  t.weight_decay = 0.1  # decoupled; never on norms or biases
  t.decay_embeddings = True  # whether weight decay also applies to embedding tables
  t.beta1 = 0.9  # adamw and lion
  t.beta2 = 0.95  # adamw and lion
  t.eps = 1e-8  # adamw
  t.grad_clip = 1.0  # global-norm clipping; 0 disables it
  t.opt_state_dtype = 'float32'  # dtype the optimizer's moments are stored in: float32 | bfloat16
  t.microbatches = 1  # gradient accumulation: the batch is split into this many sequential microbatches
  t.z_loss = 0.0  # weight of the PaLM auxiliary loss z_loss * log(Z)^2 on the softmax normaliser
  t.label_smoothing = 0.0  # share of the target mass spread uniformly over the vocabulary
  t.loss_chunk = 0  # >0: cross-entropy over chunks of this many positions, never all logits at once
  t.skip_nonfinite = False  # skip (and count) updates whose loss or gradient is NaN/inf instead of stopping
  t.log_every = 10
  t.tensorboard = True  # also write TensorBoard event files under WORKDIR/tensorboard/
  t.wandb_project = ''  # non-empty: also log to this Weights & Biases project (needs `pip install wandb`)
  t.profile_steps = ()  # (first, last): JAX profiler trace of those steps into WORKDIR/tensorboard/
  t.checkpoint_every = 200
  t.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 200  # held-out loss during training every this many steps (0: never)
  c.eval.batches = 4  # batches of held-out data for that loss
  c.eval.max_tokens = 400_000  # `llm-jax eval` reads whole held-out documents up to this many tokens

  c.mesh = ml_collections.ConfigDict()
  # Devices per axis within one slice (TPU ICI) or node (NVLink); one axis may be -1: the devices left over.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1  # context parallelism: every row's positions split over this many devices
  c.mesh.tensor = 1
  # Multi-slice / multi-node (DCN): the data or fsdp axis spans this many slices or nodes, each holding the
  # mesh above. Only these two: their collectives run once per step or per layer, which DCN can carry.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.preset = 'fsdp_tp'  # logical-axis rules: dp | fsdp | fsdp_tp (RULE_PRESETS)
  c.mesh.rules = ()  # extra (logical_axis, mesh_axes) rules, tried before the preset's
  return c


# ---------------------------------------------------------------------------------------------------------
# Loading a recipe and applying overrides


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`path/to/recipe.py[:arg]` -> the recipe's `get_config(arg)`."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(f'_llm_jax_recipe_{abs(hash(path))}', path)
  if module_spec is None or module_spec.loader is None:  # not a .py file: importlib finds no loader for it
    raise UserError(f'config file {path} is not a Python file (expected recipe.py[:variant])')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken recipe file is the user's file: name it and the problem
    raise UserError(f'config file {path} failed to load: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path} has no get_config(arg=None) function')
  try:
    cfg = module.get_config(arg or None)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f'config file {path}: get_config({arg!r}) failed: {type(e).__name__}: {e}') from e
  check_schema(cfg, default_config(), where=path)
  return cfg


def check_schema(cfg, schema, where: str, prefix: str = '') -> None:
  """Every key of `cfg` exists in `schema` (the defaults), recursively."""
  for key in cfg.keys():
    name = prefix + key
    if key not in schema:
      raise UserError(f'{where}: unknown config key {name}')
    if isinstance(schema[key], ml_collections.ConfigDict):
      check_schema(cfg[key], schema[key], where, name + '.')


def _parse_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in ('true', '1', 'yes', 'on'):
    return True
  if low in ('false', '0', 'no', 'off'):
    return False
  raise ValueError(text)


def parse_value(key: str, text: str, current: Any) -> Any:
  """Parse the command-line text for `key` into the type of its current value."""
  def bad(expected):
    return UserError(f'config key {key} expects {expected}, got {text!r}')

  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f'config key {key} is a section; set one of its keys, e.g. --config.{key}.'
                    f'{next(iter(current.keys()), "x")}=...')
  if isinstance(current, bool):
    try:
      return _parse_bool(text)
    except ValueError:
      raise bad('a boolean (true/false)') from None
  if isinstance(current, int):
    try:
      return int(text.replace('_', ''))
    except ValueError:
      raise bad('an integer') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad('a number') from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text) if text.strip() else ()
    except (ValueError, SyntaxError):
      value = tuple(part.strip() for part in text.split(','))
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  # None or another type: a Python literal if it parses, else the string.
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  node = cfg
  parts = key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise UserError(f'unknown config key {key}')
    if i < len(parts) - 1:
      node = node[part]
  last = parts[-1]
  value = parse_value(key, text, node[last])
  with node.ignore_type():
    node[last] = value


def load(spec: str | None, overrides: Sequence[tuple[str, str]] = (),
         base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The resolved, validated, locked config: recipe (or `base`, or defaults) plus overrides."""
  if spec:
    cfg = load_recipe(spec)
  elif base is not None:
    cfg = base
  else:
    cfg = default_config()
  cfg = _fill_defaults(cfg)
  for key, text in overrides:
    apply_override(cfg, key, text)
  validate(cfg)
  cfg.lock()
  return cfg


def _fill_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Recipes may return a partial config; the defaults fill the rest so every key exists."""
  full = default_config()
  _merge_into(full, cfg)
  return full


def _merge_into(dst: ml_collections.ConfigDict, src, prefix: str = '') -> None:
  for key in src.keys():
    value = src[key]
    if isinstance(dst[key], ml_collections.ConfigDict):
      _merge_into(dst[key], value, prefix + key + '.')
    else:
      if isinstance(dst[key], tuple) and isinstance(value, list):
        value = _to_tuples(value)
      with dst.ignore_type():
        dst[key] = value


def _to_tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_to_tuples(v) for v in value)
  return value


# ---------------------------------------------------------------------------------------------------------
# Validation: once, at start, each error names its key.

_DTYPES = ('float32', 'bfloat16', 'float16')
_REMAT = ('none', 'full', 'dots_no_batch', 'save_attention')
_ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')  # models/layers.py:attend
_OPTIMIZERS = ('adamw', 'adafactor', 'lion')
_SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt', 'wsd')
_FAMILIES = ('decoder', 'encoder', 'encdec')
OBJECTIVE_OF = {'decoder': 'causal', 'encoder': 'mlm', 'encdec': 'span'}
# Objectives a family may train with besides its pretraining one: chat fine-tuning and preferences.
_FINETUNE_OBJECTIVES = {'decoder': ('sft', 'dpo')}
CHAT_OBJECTIVES = ('sft', 'dpo')
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
_NORM_TYPES = ('rms', 'layer')
_NORM_POSITIONS = ('pre', 'post')
_ACTIVATIONS = ('silu', 'gelu', 'gelu_tanh', 'relu')
_POSITION_TYPES = ('rope', 'learned', 'relative')
_TXT_MODES = ('file', 'blocks')


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise UserError(f'config key {key}={value!r}: expected {expected}')


def validate(cfg: ml_collections.ConfigDict) -> None:
  defaults = default_config()
  _check_types(cfg, defaults, '')
  m, d, t = cfg.model, cfg.data, cfg.train
  _require(m.family in _FAMILIES, 'model.family', m.family, f'one of {_FAMILIES}')
  for key in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
    _require(m[key] > 0, f'model.{key}', m[key], 'a positive integer')
  _require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads', m.num_kv_heads,
           f'a divisor of model.num_heads={m.num_heads}')
  _validate_family(cfg)
  _require(m.dtype in ('auto',) + _DTYPES, 'model.dtype', m.dtype, f'one of {("auto",) + _DTYPES}')
  _require(m.param_dtype in _DTYPES, 'model.param_dtype', m.param_dtype, f'one of {_DTYPES}')
  _require(m.logits_dtype in _DTYPES, 'model.logits_dtype', m.logits_dtype, f'one of {_DTYPES}')
  _require(m.remat in _REMAT, 'model.remat', m.remat, f'one of {_REMAT}')
  _require(m.attention_impl in _ATTENTION_IMPLS, 'model.attention_impl', m.attention_impl,
           f'one of {_ATTENTION_IMPLS}')
  _require(0.0 <= m.dropout_rate < 1.0, 'model.dropout_rate', m.dropout_rate, 'in [0, 1)')
  _require(m.norm_eps > 0, 'model.norm_eps', m.norm_eps, 'positive')
  _require(d.seq_len >= 2, 'data.seq_len', d.seq_len, 'at least 2')
  _require(d.batch_size >= 1, 'data.batch_size', d.batch_size, 'a positive integer')
  _require(0 <= d.heldout_percent < 100, 'data.heldout_percent', d.heldout_percent,
           'between 0 (no held-out documents) and 99')
  _require(d.heldout_percent > 0 or cfg.eval.every == 0, 'data.heldout_percent', d.heldout_percent,
           'above 0 while eval.every > 0 (held-out loss needs held-out documents)')
  _require(d.tokenizer_train_chars > 0, 'data.tokenizer_train_chars', d.tokenizer_train_chars, 'positive')
  _require(bool(d.source), 'data.source', d.source, "'builtin', a glob of .txt/.jsonl files, or tfds:NAME")
  _check_mixture(d.mixture)
  _require(d.txt_mode in _TXT_MODES, 'data.txt_mode', d.txt_mode, f'one of {_TXT_MODES}')
  _require(d.max_doc_chars >= 1000, 'data.max_doc_chars', d.max_doc_chars, 'at least 1000')
  _require(bool(d.tfds_train_split), 'data.tfds_train_split', d.tfds_train_split, 'a split name')
  _require(d.shards >= 1, 'data.shards', d.shards, 'a positive integer')
  _require(d.batch_size % d.shards == 0, 'data.shards', d.shards,
           f'a divisor of data.batch_size={d.batch_size} (each shard gives the same rows to every batch)')
  _require(d.workers >= 0, 'data.workers', d.workers, 'a non-negative integer (0: no worker processes)')
  _require(d.prefetch >= 0, 'data.prefetch', d.prefetch, 'a non-negative integer')
  _require(t.steps >= 0, 'train.steps', t.steps, 'a non-negative integer')
  _require(t.learning_rate > 0, 'train.learning_rate', t.learning_rate, 'positive')
  _require(0 <= t.warmup_steps, 'train.warmup_steps', t.warmup_steps, 'non-negative')
  _require(0 <= t.min_lr_ratio <= 1, 'train.min_lr_ratio', t.min_lr_ratio, 'in [0, 1]')
  _require(t.weight_decay >= 0, 'train.weight_decay', t.weight_decay, 'non-negative')
  _require(0 <= t.beta1 < 1, 'train.beta1', t.beta1, 'in [0, 1)')
  _require(0 <= t.beta2 < 1, 'train.beta2', t.beta2, 'in [0, 1)')
  _require(t.grad_clip >= 0, 'train.grad_clip', t.grad_clip, 'non-negative (0 disables clipping)')
  _require(t.optimizer in _OPTIMIZERS, 'train.optimizer', t.optimizer, f'one of {_OPTIMIZERS}')
  _require(t.schedule in _SCHEDULES, 'train.schedule', t.schedule, f'one of {_SCHEDULES}')
  _require(0 < t.decay_fraction <= 1, 'train.decay_fraction', t.decay_fraction, 'in (0, 1]')
  _require(t.opt_state_dtype in ('float32', 'bfloat16'), 'train.opt_state_dtype', t.opt_state_dtype,
           "'float32' or 'bfloat16'")
  _require(t.microbatches >= 1, 'train.microbatches', t.microbatches, 'a positive integer')
  _require(d.batch_size % t.microbatches == 0, 'train.microbatches', t.microbatches,
           f'a divisor of data.batch_size={d.batch_size}')
  _require(t.z_loss >= 0, 'train.z_loss', t.z_loss, 'non-negative')
  _require(0 <= t.label_smoothing < 1, 'train.label_smoothing', t.label_smoothing, 'in [0, 1)')
  _require(t.loss_chunk >= 0 and (t.loss_chunk == 0 or d.seq_len % t.loss_chunk == 0), 'train.loss_chunk',
           t.loss_chunk, f'0 (off) or a divisor of data.seq_len={d.seq_len}')
  _check_profile_steps(t.profile_steps)
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    _require(t[key] >= 1, f'train.{key}', t[key], 'a positive integer')
  _require(cfg.eval.every >= 0, 'eval.every', cfg.eval.every, 'non-negative (0: never)')
  _require(cfg.eval.batches >= 1, 'eval.batches', cfg.eval.batches, 'a positive integer')
  _require(cfg.eval.max_tokens >= 1, 'eval.max_tokens', cfg.eval.max_tokens, 'a positive integer')
  _check_mesh(cfg.mesh)


def _validate_family(cfg) -> None:
  m, d = cfg.model, cfg.data
  extra = _FINETUNE_OBJECTIVES.get(m.family, ())
  _require(d.objective in (OBJECTIVE_OF[m.family],) + extra, 'data.objective', d.objective,
           f'{OBJECTIVE_OF[m.family]!r} for model.family={m.family!r}'
           + (f' (or {" / ".join(map(repr, extra))} to fine-tune)' if extra else ''))
  if d.objective in CHAT_OBJECTIVES:
    roles = d.chat_roles
    ok = (len(roles) >= 2 and len(set(roles)) == len(roles)
          and all(isinstance(r, str) and r and r.isidentifier() for r in roles))
    _require(ok, 'data.chat_roles', tuple(roles), 'at least two distinct role names (letters, digits, _)')
  if d.objective == 'dpo':
    _require(d.dpo_beta > 0, 'data.dpo_beta', d.dpo_beta, 'positive')
    _require(cfg.train.microbatches == 1, 'train.microbatches', cfg.train.microbatches,
             "1 for data.objective='dpo' (its step does not accumulate)")
  lora = m.lora
  _require(lora.rank >= 0, 'model.lora.rank', lora.rank, 'a non-negative integer (0: off)')
  if lora.rank:
    _require(lora.alpha > 0, 'model.lora.alpha', lora.alpha, 'positive')
    _require(len(lora.targets) > 0 and all(t in LORA_TARGETS for t in lora.targets), 'model.lora.targets',
             tuple(lora.targets), f'a non-empty tuple of {LORA_TARGETS}')
    _require(m.family == 'decoder', 'model.lora.rank', lora.rank, "0 for model.family other than 'decoder'")
  _require(m.num_decoder_layers >= 0, 'model.num_decoder_layers', m.num_decoder_layers,
           'a non-negative integer (0: model.num_layers)')
  _require(m.norm_type in _NORM_TYPES, 'model.norm_type', m.norm_type, f'one of {_NORM_TYPES}')
  _require(m.norm_position in _NORM_POSITIONS, 'model.norm_position', m.norm_position,
           f'one of {_NORM_POSITIONS}')
  _require(m.mlp_activation in _ACTIVATIONS, 'model.mlp_activation', m.mlp_activation, f'one of {_ACTIVATIONS}')
  _require(m.position_type in _POSITION_TYPES, 'model.position_type', m.position_type,
           f'one of {_POSITION_TYPES}')
  if m.position_type == 'rope':
    _require(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (rotary embeddings)')
  if m.position_type == 'learned':
    longest = max(d.seq_len, d.target_len if m.family == 'encdec' else 0)
    _require(m.max_positions >= longest, 'model.max_positions', m.max_positions,
             f'at least the longest row, {longest} (data.seq_len / data.target_len)')
  if m.position_type == 'relative':
    _require(m.relative_buckets >= 4 and m.relative_buckets % 2 == 0, 'model.relative_buckets',
             m.relative_buckets, 'an even number, at least 4')
    _require(m.relative_max_distance > m.relative_buckets // 2, 'model.relative_max_distance',
             m.relative_max_distance, f'more than half of model.relative_buckets={m.relative_buckets}')
  _require(m.type_vocab_size >= 0, 'model.type_vocab_size', m.type_vocab_size, 'a non-negative integer')
  _require(0 <= m.decoder_start_id < m.vocab_size, 'model.decoder_start_id', m.decoder_start_id,
           f'an id below model.vocab_size={m.vocab_size}')
  chunk = cfg.train.loss_chunk
  if chunk and m.family == 'encdec':  # the loss is over the decoder's rows
    _require(d.target_len % chunk == 0, 'train.loss_chunk', chunk, f'a divisor of data.target_len={d.target_len}')
  _require(not (chunk and m.family == 'encoder' and m.use_bias), 'train.loss_chunk', chunk,
           "0 for an encoder with biases: the chunked loss has no place for BERT's output bias")
  reserved = reserved_ids(d)
  _require(m.vocab_size >= 260 + reserved, 'model.vocab_size', m.vocab_size,
           f'at least {260 + reserved} (4 special tokens, 256 byte-fallback pieces'
           + (f' and the {reserved} ids data.objective={d.objective!r} reserves)' if reserved else ')'))
  if d.objective == 'mlm':
    _require(0 < d.mask_rate < 1, 'data.mask_rate', d.mask_rate, 'in (0, 1)')
    _require(d.mask_random_rate >= 0, 'data.mask_random_rate', d.mask_random_rate, 'non-negative')
    _require(d.mask_keep_rate >= 0 and d.mask_random_rate + d.mask_keep_rate <= 1, 'data.mask_keep_rate',
             d.mask_keep_rate, f'non-negative, at most 1 - data.mask_random_rate={d.mask_random_rate}')
  if d.objective == 'span':
    _require(0 < d.noise_density < 1, 'data.noise_density', d.noise_density, 'in (0, 1)')
    _require(d.mean_span_length >= 1, 'data.mean_span_length', d.mean_span_length, 'at least 1')
    _require(d.num_sentinels >= 1, 'data.num_sentinels', d.num_sentinels, 'a positive integer')
    _require(d.target_len >= 2, 'data.target_len', d.target_len, 'at least 2')
    from llm_jax.data.objectives import span_chunk_length
    _require(span_chunk_length(d.seq_len, d.target_len, d.noise_density, d.mean_span_length) >= 2,
             'data.target_len', d.target_len, f'room for the targets of at least two tokens of input '
             f'(data.seq_len={d.seq_len}, data.noise_density={d.noise_density})')


def reserved_ids(data_cfg, tokenizer=None) -> int:
  """Ids the objective takes after the tokenizer's pieces: the mask token, the span sentinels, or the chat
  template's markers. None when the tokenizer has its own: a mask token (BERT's [MASK]), a chat template
  (tokenizer_config.json's chat_template renders conversations with the tokenizer's own special tokens)."""
  if tokenizer is not None and data_cfg.objective in CHAT_OBJECTIVES and tokenizer.chat_template:
    return 0
  if tokenizer is not None and data_cfg.objective == 'mlm' and tokenizer.mask_id >= 0:
    return 0
  if data_cfg.objective in CHAT_OBJECTIVES:
    return len(data_cfg.chat_roles) + 1  # a marker per role, then <|end|>
  return {'mlm': 1, 'span': data_cfg.num_sentinels}.get(data_cfg.objective, 0)


def _check_profile_steps(steps) -> None:
  ints = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)
  ok = len(steps) <= 2 and ints and (len(steps) < 2 or steps[0] <= steps[1])
  _require(ok, 'train.profile_steps', tuple(steps), 'empty, one step, or first,last with 1 <= first <= last')


def _check_types(cfg, defaults, prefix: str) -> None:
  for key in defaults.keys():
    name = prefix + key
    want, got = defaults[key], cfg[key]
    if isinstance(want, ml_collections.ConfigDict):
      _check_types(got, want, name + '.')
      continue
    if isinstance(want, bool):
      ok = isinstance(got, bool)
    elif isinstance(want, int):
      ok = isinstance(got, int) and not isinstance(got, bool)
    elif isinstance(want, float):
      ok = isinstance(got, (int, float)) and not isinstance(got, bool)
    elif isinstance(want, (tuple, list)):
      ok = isinstance(got, (tuple, list))
    else:
      ok = want is None or isinstance(got, type(want))
    if not ok:
      raise UserError(f'config key {name}={got!r}: expected {type(want).__name__}')


def _check_mesh(mesh) -> None:
  for axis in MESH_AXES:
    _require(mesh[axis] == -1 or mesh[axis] >= 1, f'mesh.{axis}', mesh[axis], 'a positive integer or -1')
  auto = [a for a in MESH_AXES if mesh[a] == -1]
  if len(auto) > 1:
    raise UserError(f'config keys {", ".join("mesh." + a for a in auto)} are all -1: at most one mesh axis may '
                    'take the devices the others leave')
  for key in ('dcn_data', 'dcn_fsdp'):
    _require(mesh[key] >= 1, f'mesh.{key}', mesh[key], 'a positive integer')
  _require(mesh.preset in RULE_PRESETS, 'mesh.preset', mesh.preset, f'one of {tuple(RULE_PRESETS)}')
  _check_rules(mesh.rules)


def _check_mixture(mixture) -> None:
  for entry in mixture:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] > 0):
      raise UserError(f'config key data.mixture: each entry is (source, positive weight), got {entry!r}')
  if mixture:
    from llm_jax.data.mixture import check_weights
    check_weights([w for _, w in mixture])


def _check_rules(rules) -> None:
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise UserError(f'config key mesh.rules: each rule is (logical_axis, mesh_axes), got {rule!r}')
    if rule[0] not in LOGICAL_AXES:
      raise UserError(f'config key mesh.rules: rule {tuple(rule)!r} names logical axis {rule[0]!r}, '
                      f'expected one of {LOGICAL_AXES}')
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in targets:
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f'config key mesh.rules: rule {tuple(rule)!r} names mesh axis {axis!r}, '
                        f'expected one of {MESH_AXES}')


# ---------------------------------------------------------------------------------------------------------
# JSON: the resolved config of a run is saved in its workdir and read back by eval / generate / resume.


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str) -> ml_collections.ConfigDict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON (line {e.lineno}): {e.msg}') from None
  if not isinstance(data, dict):
    raise UserError(f'{path}: expected a JSON object of config sections')
  partial = ml_collections.ConfigDict(data)
  check_schema(partial, default_config(), where=path)
  cfg = _fill_defaults(partial)
  validate(cfg)
  cfg.lock()
  return cfg


def write_json_atomic(cfg: ml_collections.ConfigDict, path: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(to_json(cfg))
    f.write('\n')
  os.replace(tmp, path)


def model_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                      ignore: Sequence[str] = ()) -> list[str]:
  """Keys of `model` that differ: a checkpoint of one cannot be restored into the other."""
  return [f'model.{k}' for k in a.model.keys() if k not in ignore and a.model[k] != b.model[k]]
