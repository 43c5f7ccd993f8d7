"""An index of passages: their vectors by one embedder, searched exactly on the device.

    DIR/index.json              what the index is: its embedder (work directory, fingerprint, pooling,
                                width), passage sizes, what was indexed, the names of the two files below
    DIR/vectors.G.safetensors   float32 [passages, width] under the name "vectors"
    DIR/passages.G.jsonl        one passage per line (source, character span, lines, text), same order

G is the index's generation. Building or appending writes the next generation's files beside the current
ones, then replaces index.json (the one atomic step: before it the old index is whole, after it the new
one), then removes the old files. No pickle anywhere.

The embedder's fingerprint hashes its config, step, tokenizer and token embedding table: appending with
another embedder, or searching after the embedder's work directory was retrained or replaced, is refused
(vectors of two models are not comparable).

Search is exact: the scores of every passage (inner products; cosines for a normalising embedder) in one
program, with the passages split over every device of the mesh; each device keeps its own top k and the
final top k is taken of those. Letters: Q queries, N passages, D width, S shards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import storage
from llm_jax.errors import UserError
from llm_jax.retrieval.passages import Passage

FORMAT = 'llm-jax index 1'
MANIFEST = 'index.json'


def fingerprint(run) -> str:
  """A hash that tells one embedder (model, weights, tokenizer) from another."""
  h = hashlib.sha256()
  h.update(json.dumps(run.cfg.model.to_dict(), sort_keys=True, default=str).encode())
  h.update(str(run.step).encode())
  h.update(run.tokenizer.serialized())
  table = run.params['embedding'] if 'embedding' in run.params else jax.tree.leaves(run.params)[0]
  from llm_jax import sharding
  h.update(np.ascontiguousarray(sharding.fetch(table), np.float32).tobytes())
  return h.hexdigest()[:16]


def embedder_record(run, embedder) -> dict:
  return {'workdir': os.path.abspath(run.workdir), 'fingerprint': fingerprint(run), 'step': int(run.step),
          'dim': embedder.dim, 'pooling': embedder.pooling.to_dict()}


@dataclass
class Index:
  path: str
  meta: dict
  vectors: np.ndarray  # [N, D] float32
  passages: list[Passage]

  @property
  def embedder(self) -> dict:
    return self.meta['embedder']

  def __len__(self) -> int:
    return len(self.passages)


def read_manifest(path: str, flag: str) -> dict:
  if not os.path.exists(path):
    raise UserError(f'{flag}={path}: the index does not exist (build one with `llm-jax index`)')
  if not os.path.isdir(path):
    raise UserError(f'{flag}={path} is not a directory (an index is a directory made by `llm-jax index`)')
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise UserError(f'{flag}={path} has no {MANIFEST} (not an llm-jax index?)')
  meta = storage.read_json(mpath)
  if meta.get('format') != FORMAT:
    raise UserError(f'{mpath}: not an llm-jax index (format {FORMAT!r})')
  for key in ('embedder', 'vectors', 'passages', 'generation', 'passage_tokens', 'overlap'):
    if key not in meta:
      raise UserError(f'{mpath}: no {key!r}')
  return meta


def load(path: str, flag: str = '--index') -> Index:
  meta = read_manifest(path, flag)
  vpath = os.path.join(path, meta['vectors'])
  try:
    from safetensors.numpy import load_file
    vectors = load_file(vpath)['vectors']
  except FileNotFoundError:
    raise UserError(f'{flag}={path}: {meta["vectors"]} is missing') from None
  except Exception as e:  # safetensors raises its own errors for a damaged file
    raise UserError(f'{vpath} is not a readable safetensors file of "vectors" ({type(e).__name__})') from None
  ppath = os.path.join(path, meta['passages'])
  passages = []
  try:
    with open(ppath, encoding='utf-8') as f:
      for lineno, line in enumerate(f, 1):
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f'{ppath}:{lineno}: not valid JSON ({e.msg})') from None
        passages.append(Passage.from_dict(record, f'{ppath}:{lineno}'))
  except OSError as e:
    raise UserError(f'cannot read {ppath}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise UserError(f'{ppath} is not UTF-8 text') from None
  if vectors.ndim != 2 or len(vectors) != len(passages) or vectors.shape[1] != meta['embedder'].get('dim'):
    raise UserError(f'{flag}={path}: {vectors.shape} vectors for {len(passages)} passages of width '
                    f'{meta["embedder"].get("dim")}: the index is damaged, build it again')
  return Index(path, meta, np.asarray(vectors, np.float32), passages)


def check_embedder(index: Index, run, flag: str = '--embedder') -> None:
  """Refuses an embedder other than the one the index was built with."""
  want = index.embedder
  got = fingerprint(run)
  if got != want.get('fingerprint'):
    same_place = os.path.abspath(run.workdir or '') == want.get('workdir')
    if same_place:
      raise UserError(f'index {index.path} was built by the embedder in {want.get("workdir")} at step '
                      f'{want.get("step")}; that work directory now holds another model (step {run.step}): '
                      'build the index again')
    raise UserError(f'index {index.path} was built by the embedder {want.get("workdir")}; {flag}={run.workdir} is '
                    'another model, whose vectors are not comparable: build a new index with it (--output=NEW)')


def write(path: str, meta: dict, vectors: np.ndarray, passages: list[Passage]) -> None:
  """The next generation of the index at `path` (a new directory, or an existing index), atomically."""
  from safetensors.numpy import save_file
  old = None
  if os.path.isfile(os.path.join(path, MANIFEST)):
    old = read_manifest(path, '--output')
  generation = (old['generation'] + 1) if old else 1
  meta = dict(meta, format=FORMAT, generation=generation, count=len(passages),
              vectors=f'vectors.{generation}.safetensors', passages=f'passages.{generation}.jsonl')
  created = not os.path.exists(path)
  try:
    os.makedirs(path, exist_ok=True)
    save_file({'vectors': np.ascontiguousarray(vectors, np.float32)}, os.path.join(path, meta['vectors']))
    with open(os.path.join(path, meta['passages']), 'w', encoding='utf-8') as f:
      for p in passages:
        f.write(json.dumps(p.to_dict(), ensure_ascii=False) + '\n')
    tmp = os.path.join(path, f'{MANIFEST}.tmp{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
      f.write('\n')
    os.replace(tmp, os.path.join(path, MANIFEST))
  except OSError as e:
    for name in (meta['vectors'], meta['passages']):  # the old generation stays the index
      with contextlib.suppress(OSError):
        os.remove(os.path.join(path, name))
    if created:
      shutil.rmtree(path, ignore_errors=True)
    raise UserError(f'cannot write the index {path}: {e.strerror}') from None
  if old:
    for name in (old['vectors'], old['passages']):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(path, name))


# ---------------------------------------------------------------------------------------------------------
# Search on the device


def _top_k(k: int, shard_axes, mesh, v_ND, valid_N, q_QD):
  S = int(np.prod([mesh.shape[a] for a in shard_axes]))
  s_QN = jnp.einsum('QD,ND->QN', q_QD, v_ND, preferred_element_type=jnp.float32)
  s_QN = jnp.where(valid_N[None], s_QN, -jnp.inf)
  Q, N = s_QN.shape
  s_QSn = jax.lax.with_sharding_constraint(s_QN.reshape(Q, S, N // S),
                                           NamedSharding(mesh, P(None, shard_axes, None)))
  local = min(k, N // S)
  top_QSk, at_QSk = jax.lax.top_k(s_QSn, local)  # each shard's own best, where its scores are
  at_QSk = at_QSk + (jnp.arange(S, dtype=at_QSk.dtype) * (N // S))[None, :, None]
  top_QK, pick_QK = jax.lax.top_k(top_QSk.reshape(Q, S * local), k)
  return top_QK, jnp.take_along_axis(at_QSk.reshape(Q, S * local), pick_QK, axis=1)


class Searcher:
  """The index's vectors on the mesh (rows split over every device) and a compiled exact top-k."""

  def __init__(self, vectors: np.ndarray, mesh):
    self.mesh = mesh
    self.count = len(vectors)
    self._axes = tuple(mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in self._axes]))
    rows = max(-(-self.count // shards), 1) * shards
    v = np.zeros((rows, vectors.shape[1]), np.float32)
    v[:self.count] = vectors
    valid = np.arange(rows) < self.count
    from llm_jax import sharding
    self._v = sharding.host_to_global(v, NamedSharding(mesh, P(self._axes, None)))
    self._valid = sharding.host_to_global(valid, NamedSharding(mesh, P(self._axes)))
    self._rows_per_shard = rows // shards

  @functools.lru_cache(maxsize=8)
  def _compiled(self, k: int):
    return jax.jit(functools.partial(_top_k, k, self._axes, self.mesh))

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], passage numbers [Q, k]) best first; k is at most the number of passages."""
    from llm_jax import sharding
    k = max(1, min(k, self.count))
    q = np.asarray(queries, np.float32)
    Q = q.shape[0]
    padded = np.zeros((_pow2(Q), q.shape[1]), np.float32)  # few programs for any number of queries
    padded[:Q] = q
    scores, ids = self._compiled(k)(self._v, self._valid, sharding.host_to_global(padded,
                                                                                  sharding.replicated(self.mesh)))
    return sharding.fetch(scores)[:Q], sharding.fetch(ids)[:Q]


def _pow2(n: int) -> int:
  size = 1
  while size < n:
    size *= 2
  return size
