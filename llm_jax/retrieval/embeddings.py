"""Sentence embeddings from an encoder run: text -> one vector per text.

How tokens become one vector is what the checkpoint's sentence-transformers files say, when the workdir has
them (`convert from-hf` copies them): `modules.json` lists the modules (Transformer, Pooling, Normalize),
the Pooling module's `config.json` its modes, `sentence_bert_config.json` the longest input
(`max_seq_length`). A run without them (one of ours) pools by the mean over its real tokens and normalises
to unit length, so that inner products are cosines; its longest input is data.seq_len.

A text is [BOS/CLS] + its tokens + [EOS/SEP] as the run was trained (data.add_bos / add_eos), cut at the
longest input. Texts are sorted by length and padded to a few fixed lengths (powers of two) and a fixed
batch, so that a handful of programs are compiled; the batch is split over the mesh's batch axes.

Letters: B batch, T tokens, D embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding, storage
from llm_jax.errors import UserError

MODULES = 'modules.json'
ST_CONFIG = 'sentence_bert_config.json'
# sentence-transformers' legacy boolean keys, in the order its Pooling module concatenates them.
_LEGACY_MODES = (('pooling_mode_cls_token', 'cls'), ('pooling_mode_max_tokens', 'max'),
                 ('pooling_mode_mean_tokens', 'mean'), ('pooling_mode_mean_sqrt_len_tokens', 'mean_sqrt_len_tokens'),
                 ('pooling_mode_weightedmean_tokens', 'weightedmean'), ('pooling_mode_lasttoken', 'lasttoken'))
MODES = tuple(m for _, m in _LEGACY_MODES)
DEFAULT_BATCH = 32
_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Pooling:
  modes: tuple[str, ...] = ('mean',)
  normalize: bool = True
  max_len: int = 512  # tokens per text, specials included
  source: str = 'default'  # where the settings came from, for messages and the index's record

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def st_files(hf_dir: str) -> dict[str, bytes]:
  """name -> bytes of the sentence-transformers files of a Hugging Face directory (none: {}), for
  `convert from-hf` to copy into the work directory."""
  out = {}
  for name in (MODULES, ST_CONFIG):
    path = os.path.join(hf_dir, name)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[name] = f.read()
  for module in _modules(hf_dir) if MODULES in out else []:
    rel = os.path.join(module.get('path') or '', 'config.json')
    if module.get('path') and os.path.isfile(os.path.join(hf_dir, rel)):
      with open(os.path.join(hf_dir, rel), 'rb') as f:
        out[rel] = f.read()
  return out


def _modules(directory: str) -> list[dict]:
  path = os.path.join(directory, MODULES)
  modules = storage.read_json(path, list)
  if not all(isinstance(m, dict) and isinstance(m.get('type'), str) for m in modules):
    raise UserError(f'{path}: expected a list of {{"type", "path"}} objects')
  return modules


def pooling_of(workdir: str | None, cfg) -> Pooling:
  """The pooling, normalisation and longest input of the run in `workdir`."""
  limit = cfg.model.max_positions if cfg.model.position_type == 'learned' else 1 << 30
  default_len = min(cfg.data.seq_len, limit)
  if not workdir or not os.path.isfile(os.path.join(workdir, MODULES)):
    return Pooling(max_len=default_len)
  modes, normalize = None, False
  for module in _modules(workdir):
    kind = module['type'].rsplit('.', 1)[-1]
    if kind == 'Transformer':
      continue
    if kind == 'Normalize':
      normalize = True
    elif kind == 'Pooling':
      path = os.path.join(workdir, module.get('path') or '', 'config.json')
      modes = _pooling_modes(storage.read_json(path), path)
    else:
      raise UserError(f'{os.path.join(workdir, MODULES)}: module {module["type"]} is not supported (llm-jax '
                      'embeds with Transformer, Pooling and Normalize modules)')
  if modes is None:
    raise UserError(f'{os.path.join(workdir, MODULES)} names no Pooling module')
  max_len = default_len
  st_path = os.path.join(workdir, ST_CONFIG)
  if os.path.isfile(st_path):
    given = storage.read_json(st_path).get('max_seq_length')
    if isinstance(given, int) and given > 0:
      max_len = min(given, limit)
  return Pooling(modes, normalize, max_len, 'sentence-transformers')


def _pooling_modes(config: dict, where: str) -> tuple[str, ...]:
  if 'pooling_mode' in config:  # sentence-transformers >= 5: one name or a list
    given = config['pooling_mode']
    modes = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, list) else ()
  else:
    modes = tuple(mode for key, mode in _LEGACY_MODES if config.get(key))
  modes = tuple('mean_sqrt_len_tokens' if m == 'mean_sqrt_len' else m for m in modes)
  bad = [m for m in modes if m not in MODES]
  if not modes or bad:
    raise UserError(f'{where}: pooling mode {bad[0] if bad else "(none)"!r} is not one of {", ".join(MODES)}')
  return modes


def pool(modes: Sequence[str], normalize: bool, x_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """The sentence vectors [B, D x len(modes)] of hidden states, over the real tokens (mask 1) of each row."""
  x_BTD = x_BTD.astype(jnp.float32)
  m_BT1 = mask_BT.astype(jnp.float32)[..., None]
  count_B1 = jnp.maximum(m_BT1.sum(axis=1), 1e-9)  # sentence-transformers' clamp
  out = []
  for mode in modes:
    if mode == 'cls':
      out.append(x_BTD[:, 0])
    elif mode == 'max':
      out.append(jnp.where(m_BT1 > 0, x_BTD, -jnp.inf).max(axis=1))
    elif mode == 'mean':
      out.append((x_BTD * m_BT1).sum(axis=1) / count_B1)
    elif mode == 'mean_sqrt_len_tokens':
      out.append((x_BTD * m_BT1).sum(axis=1) / jnp.sqrt(count_B1))
    elif mode == 'weightedmean':  # position-weighted (SGPT): later tokens count more
      w_BT1 = m_BT1 * jnp.arange(1, x_BTD.shape[1] + 1, dtype=jnp.float32)[None, :, None]
      out.append((x_BTD * w_BT1).sum(axis=1) / jnp.maximum(w_BT1.sum(axis=1), 1e-9))
    elif mode == 'lasttoken':
      last_B = jnp.maximum(mask_BT.sum(axis=1) - 1, 0)
      out.append(jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0])
    else:
      raise ValueError(mode)
  v_BD = jnp.concatenate(out, axis=-1)
  if normalize:  # torch.nn.functional.normalize: x / max(|x|, 1e-12)
    v_BD = v_BD / jnp.maximum(jnp.linalg.norm(v_BD, axis=-1, keepdims=True), 1e-12)
  return v_BD


def _embed_step(model, mesh, rules, modes, normalize, params, tokens_BT, mask_BT):
  with sharding.activation_sharding(mesh, rules):
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
    x_BTD = model.apply({'params': params}, tokens_BT, positions_BT, mask_BT, hidden_only=True)
    return pool(modes, normalize, x_BTD, mask_BT)


class Embedder:
  """An encoder run's text -> vector function, compiled once per padded length."""

  def __init__(self, run, batch_size: int = DEFAULT_BATCH):
    from llm_jax import models
    models.require_family(run.cfg, 'embed', 'embeds',
                          why='sentence embeddings come from an encoder (model.family=encoder: a BERT run such '
                          'as the bert_base recipe, or one converted with `llm-jax convert from-hf`)')
    self.run = run
    self.pooling = pooling_of(getattr(run, 'workdir', None), run.cfg)
    spec = sharding.logical_to_spec(('batch', 'seq'), run.rules)
    shards = int(np.prod([run.mesh.shape[a] for a in sharding._axes(spec[0])])) if spec else 1
    self._shards = shards
    self.batch_size = -(-max(batch_size, 1) // shards) * shards  # whole rows on every batch shard
    self._sharding = sharding.named_sharding(run.mesh, ('batch', None), run.rules)
    self._fn = jax.jit(functools.partial(_embed_step, run.model, run.mesh, run.rules, self.pooling.modes,
                                         self.pooling.normalize))
    d = run.cfg.data
    tok = run.tokenizer
    self._bos = [tok.bos_id] if d.add_bos and tok.bos_id >= 0 else []
    self._eos = [tok.eos_id] if d.add_eos and tok.eos_id >= 0 else []
    if self.pooling.max_len <= len(self._bos) + len(self._eos):
      raise UserError(f'the embedder reads {self.pooling.max_len} tokens per text: no room for any text')

  @property
  def dim(self) -> int:
    return self.run.cfg.model.embed_dim * len(self.pooling.modes)

  @property
  def room(self) -> int:
    """Tokens of text per input, besides the specials."""
    return self.pooling.max_len - len(self._bos) - len(self._eos)

  def ids(self, text: str) -> list[int]:
    return self.wrap(self.run.tokenizer.encode(text))

  def wrap(self, ids: Sequence[int]) -> list[int]:
    """Text ids -> the model's input: the specials around them, cut to the longest input."""
    return self._bos + list(ids[:self.room]) + self._eos

  def embed_ids(self, rows: Sequence[Sequence[int]], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Vectors [len(rows), dim] (float32) of model inputs made by `wrap`."""
    out = np.zeros((len(rows), self.dim), np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      # A short batch (one query) is padded to a power of two, not to the full batch: 64 rows for one
      # query cost 64 times the work.
      B = min(self.batch_size, -(-_bucket(len(chunk), 1 << 30, 1) // self._shards) * self._shards)
      T = _bucket(max(len(rows[i]) for i in chunk), self.pooling.max_len)
      tokens = np.zeros((B, T), np.int32)
      mask = np.zeros((B, T), np.int32)
      for r, i in enumerate(chunk):
        tokens[r, :len(rows[i])] = rows[i]
        mask[r, :len(rows[i])] = 1
      mask[len(chunk):, 0] = 1  # filler rows: one token, so no row is all padding
      v = self._fn(self.run.params, sharding.host_to_global(tokens, self._sharding),
                   sharding.host_to_global(mask, self._sharding))
      out[chunk] = sharding.fetch(v)[:len(chunk)]
      if progress is not None:
        progress(len(chunk))
    return out

  def __call__(self, texts: Sequence[str], progress=None) -> np.ndarray:
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise UserError(f'text {i + 1} is not a string')
    return self.embed_ids([self.ids(t) for t in texts], progress)


def _bucket(n: int, max_len: int, smallest: int = _MIN_BUCKET) -> int:
  size = smallest
  while size < n:
    size *= 2
  return min(size, max_len) if n <= max_len else n


def embedder(run) -> Embedder:
  """The run's Embedder, made once."""
  found = run.__dict__.get('_embedder')
  if found is None:
    found = run.__dict__['_embedder'] = Embedder(run)
  return found


def embed(run, texts: Sequence[str]) -> np.ndarray:
  """[len(texts), dim] float32 sentence embeddings of `texts` by the encoder run `run` (inference.Run)."""
  return embedder(run)(list(texts))
