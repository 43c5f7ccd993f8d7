"""Validation of a whole config: once, at start, each error naming its key and the values it allows.

The allowed values come from the modules that implement them (the model-family and objective registries,
the optimizers and schedules, activations, remat policies, attention kernels, mesh presets), so adding one
is a change in one place.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llm_jax import models
from llm_jax.config.schema import default_config
from llm_jax.data import objectives
from llm_jax.data.files import DECODE_ERRORS, TXT_MODES
from llm_jax.data.mixture import check_weights
from llm_jax.errors import UserError
from llm_jax.models.attention import ATTENTION_IMPLS
from llm_jax.models.layers import ACTIVATIONS, LORA_TARGETS, NORM_POSITIONS, NORM_TYPES, POSITION_TYPES, ROPE_SCALINGS
from llm_jax.models import attention_kernels as kernels
from llm_jax.models.transformer import REMAT_POLICIES
from llm_jax.sharding import LOGICAL_AXES, MESH_AXES, RULE_PRESETS
from llm_jax.train.optim import OPTIMIZERS, SCHEDULES


_DTYPES = ('float32', 'bfloat16', 'float16')


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise UserError(f'config key {key}={value!r}: expected {expected}')


def validate(cfg: ml_collections.ConfigDict) -> None:
  defaults = default_config()
  _check_types(cfg, defaults, '')
  m, d, t = cfg.model, cfg.data, cfg.train
  _require(m.family in models.FAMILIES, 'model.family', m.family, f'one of {tuple(models.FAMILIES)}')
  for key in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
    _require(m[key] > 0, f'model.{key}', m[key], 'a positive integer')
  _require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads', m.num_kv_heads,
           f'a divisor of model.num_heads={m.num_heads}')
  _validate_family(cfg)
  _require(m.dtype in ('auto',) + _DTYPES, 'model.dtype', m.dtype, f'one of {("auto",) + _DTYPES}')
  _require(m.param_dtype in _DTYPES, 'model.param_dtype', m.param_dtype, f'one of {_DTYPES}')
  _require(m.logits_dtype in _DTYPES, 'model.logits_dtype', m.logits_dtype, f'one of {_DTYPES}')
  _require(m.remat in ('none',) + tuple(REMAT_POLICIES), 'model.remat', m.remat,
           f'one of {("none",) + tuple(REMAT_POLICIES)}')
  _require(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl', m.attention_impl,
           f'one of {ATTENTION_IMPLS}')
  _require(m.attention_impl == 'auto' or not kernels.IMPLS[m.attention_impl].kernel or m.position_type != 'relative',
           'model.attention_impl', m.attention_impl, "'xla' or 'auto' with model.position_type='relative' (the "
           "flash kernels cannot add T5's relative-position bias)")
  for key in ('attention_block_q', 'attention_block_kv'):
    _require(m[key] >= 0 and m[key] % 128 == 0, f'model.{key}', m[key], "0 (the kernel's default) or a positive "
             'multiple of 128')
  _require(0.0 <= m.dropout_rate < 1.0, 'model.dropout_rate', m.dropout_rate, 'in [0, 1)')
  _require(m.norm_eps > 0, 'model.norm_eps', m.norm_eps, 'positive')
  _require(d.seq_len >= 2, 'data.seq_len', d.seq_len, 'at least 2')
  _require(d.batch_size >= 1, 'data.batch_size', d.batch_size, 'a positive integer')
  _require(0 <= d.heldout_percent < 100, 'data.heldout_percent', d.heldout_percent,
           'between 0 (no held-out documents) and 99')
  _require(d.heldout_percent > 0 or cfg.eval.every == 0 or bool(d.heldout_source), 'data.heldout_percent',
           d.heldout_percent, 'above 0 while eval.every > 0 (held-out loss needs held-out documents; or set '
           'data.heldout_source)')
  _require(_known_encoding(d.encoding), 'data.encoding', d.encoding, 'a Python codec name such as utf-8 or latin-1')
  _require(d.decode_errors in DECODE_ERRORS, 'data.decode_errors', d.decode_errors, f'one of {DECODE_ERRORS}')
  _require(d.tokenizer_train_chars > 0, 'data.tokenizer_train_chars', d.tokenizer_train_chars, 'positive')
  _require(bool(d.source), 'data.source', d.source, "'builtin', a glob of .txt/.jsonl files, or tfds:NAME")
  _check_mixture(d.mixture)
  _require(d.txt_mode in TXT_MODES, 'data.txt_mode', d.txt_mode, f'one of {TXT_MODES}')
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
  _require(t.optimizer in OPTIMIZERS, 'train.optimizer', t.optimizer, f'one of {OPTIMIZERS}')
  _require(0 <= t.muon_beta < 1, 'train.muon_beta', t.muon_beta, 'in [0, 1)')
  # LoRA's optimizer sees only the adapters, whose low-rank factors are not the model's matrices Muon is for.
  _require(not (t.optimizer == 'muon' and m.lora.rank), 'train.optimizer', t.optimizer,
           'adamw, adafactor or lion when model.lora.rank is set (Muon is for full matrices)')
  _require(t.schedule in SCHEDULES, 'train.schedule', t.schedule, f'one of {SCHEDULES}')
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
  family = models.FAMILIES[m.family]
  own, extra = objectives.for_family(m.family, True), objectives.for_family(m.family, False)
  _require(d.objective in own + extra, 'data.objective', d.objective,
           f'{" / ".join(map(repr, own))} for model.family={m.family!r}'
           + (f' (or {" / ".join(map(repr, extra))} to fine-tune)' if extra else ''))
  objective = objectives.of(d)
  objective.check(cfg, _require)
  lora = m.lora
  _require(lora.rank >= 0, 'model.lora.rank', lora.rank, 'a non-negative integer (0: off)')
  if lora.rank:
    _require(lora.alpha > 0, 'model.lora.alpha', lora.alpha, 'positive')
    _require(len(lora.targets) > 0 and all(t in LORA_TARGETS for t in lora.targets), 'model.lora.targets',
             tuple(lora.targets), f'a non-empty tuple of {LORA_TARGETS}')
    _require(family.lora, 'model.lora.rank', lora.rank, f'0 for model.family={m.family!r} (LoRA is wired for '
             f'{" / ".join(repr(f.name) for f in models.FAMILIES.values() if f.lora)})')
  _require(m.num_decoder_layers >= 0, 'model.num_decoder_layers', m.num_decoder_layers,
           'a non-negative integer (0: model.num_layers)')
  _require(m.norm_type in NORM_TYPES, 'model.norm_type', m.norm_type, f'one of {NORM_TYPES}')
  _require(m.norm_position in NORM_POSITIONS, 'model.norm_position', m.norm_position,
           f'one of {NORM_POSITIONS}')
  _require(m.mlp_activation in ACTIVATIONS, 'model.mlp_activation', m.mlp_activation,
           f'one of {tuple(ACTIVATIONS)}')
  _require(m.position_type in POSITION_TYPES, 'model.position_type', m.position_type,
           f'one of {POSITION_TYPES}')
  if m.position_type == 'rope':
    _require(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (rotary embeddings)')
  if m.position_type == 'learned':
    longest = max(d.seq_len, d.target_len if family.two_stacks else 0)
    _require(m.max_positions >= longest, 'model.max_positions', m.max_positions,
             f'at least the longest row, {longest} (data.seq_len / data.target_len)')
  if m.position_type == 'relative':
    _require(m.relative_buckets >= 4 and m.relative_buckets % 2 == 0, 'model.relative_buckets',
             m.relative_buckets, 'an even number, at least 4')
    _require(m.relative_max_distance > m.relative_buckets // 2, 'model.relative_max_distance',
             m.relative_max_distance, f'more than half of model.relative_buckets={m.relative_buckets}')
  _validate_layout(cfg)
  _require(m.type_vocab_size >= 0, 'model.type_vocab_size', m.type_vocab_size, 'a non-negative integer')
  _require(0 <= m.decoder_start_id < m.vocab_size, 'model.decoder_start_id', m.decoder_start_id,
           f'an id below model.vocab_size={m.vocab_size}')
  chunk = cfg.train.loss_chunk
  if chunk and family.two_stacks:  # the loss is over the decoder's rows
    _require(d.target_len % chunk == 0, 'train.loss_chunk', chunk, f'a divisor of data.target_len={d.target_len}')
  _require(not (chunk and family.output_bias and m.use_bias), 'train.loss_chunk', chunk,
           "0 for an encoder with biases: the chunked loss has no place for BERT's output bias")
  reserved = objectives.reserved_ids(d)
  _require(m.vocab_size >= 260 + reserved, 'model.vocab_size', m.vocab_size,
           f'at least {260 + reserved} (4 special tokens, 256 byte-fallback pieces'
           + (f' and the {reserved} ids data.objective={d.objective!r} reserves)' if reserved else ')'))


def _validate_layout(cfg) -> None:
  """The decoder layouts of Llama 3, Qwen, Mistral and Gemma (their keys are decoder-only)."""
  m = cfg.model
  rs = m.rope_scaling
  _require(rs.type in ROPE_SCALINGS, 'model.rope_scaling.type', rs.type, f'one of {ROPE_SCALINGS}')
  _require(rs.factor >= 1, 'model.rope_scaling.factor', rs.factor, 'at least 1')
  if rs.type != 'none':
    _require(m.position_type == 'rope', 'model.rope_scaling.type', rs.type,
             f"'none' for model.position_type={m.position_type!r}")
  if rs.type == 'llama3':
    _require(rs.low_freq_factor > 0, 'model.rope_scaling.low_freq_factor', rs.low_freq_factor, 'positive')
    _require(rs.high_freq_factor > rs.low_freq_factor, 'model.rope_scaling.high_freq_factor',
             rs.high_freq_factor, f'more than model.rope_scaling.low_freq_factor={rs.low_freq_factor}')
    _require(rs.original_max_positions > 0, 'model.rope_scaling.original_max_positions',
             rs.original_max_positions, 'a positive integer')
  for key in ('sliding_window', 'global_every', 'query_scale'):
    _require(m[key] >= 0, f'model.{key}', m[key], 'a non-negative integer (0: off)')
  for key in ('attn_logit_softcap', 'final_logit_softcap'):
    _require(m[key] >= 0, f'model.{key}', m[key], 'non-negative (0: off)')
  _require(m.global_every == 0 or m.sliding_window > 0, 'model.global_every', m.global_every,
           '0 without model.sliding_window')
  layouts = models.family_of(m).decoder_layouts
  others = ' or '.join(repr(f.name) for f in models.FAMILIES.values() if f.decoder_layouts)
  for key in ('qkv_bias', 'qk_norm', 'norm_offset', 'embed_scale', 'post_norms'):
    _require(not m[key] or layouts, f'model.{key}', m[key], f'False for model.family other than {others}')
  for key in ('sliding_window', 'query_scale', 'attn_logit_softcap', 'final_logit_softcap'):
    _require(not m[key] or layouts, f'model.{key}', m[key], f'0 for model.family other than {others}')
  _require(not m.post_norms or m.norm_position == 'pre', 'model.post_norms', m.post_norms,
           "False with model.norm_position='post'")
  _require(not (m.attn_logit_softcap and m.attention_impl == 'cudnn'), 'model.attention_impl', m.attention_impl,
           "'auto' or 'xla' with model.attn_logit_softcap (cuDNN's kernel has no soft-capping)")


def _known_encoding(name: str) -> bool:
  import codecs
  try:
    return codecs.lookup(name) is not None
  except LookupError:
    return False


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
