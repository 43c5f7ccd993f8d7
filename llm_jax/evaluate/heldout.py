"""Evaluation of a run's latest checkpoint on text: loss, perplexity, token accuracy, bits per byte, and the
bits per byte that general-purpose compressors (gzip -9, xz -9) get on exactly the same bytes, for scale.

The text is the run's held-out split, or every document of another source (`data`: anything
`sources.open_source` reads). Multiple-choice tasks live in tasks.py.
"""

from __future__ import annotations

import gzip
import lzma
import math
import sys
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np

from llm_jax import sharding
from llm_jax.data import objectives, pipeline, sources
from llm_jax.errors import UserError
from llm_jax.train.step import make_eval_step


def score(eval_step, params, batches: Iterable[dict[str, np.ndarray]], batch_sharding,
          progress: Callable[[int], None] | None = None, whole: bool = False) -> dict:
  """Sum the eval step's statistics over batches; loss is per predicted token. `progress(tokens)` is called
  as each batch is dispatched, with the tokens it scores. Batches are this process's rows of each global
  batch, or with `whole` the entire global batch, the same on every process."""
  totals = {'nll_sum': 0.0, 'tokens': 0.0, 'correct': 0.0}
  pending = None
  for batch in batches:
    if whole:
      batch_global = {k: sharding.host_to_global(v, batch_sharding) for k, v in batch.items()}
    else:
      batch_global = pipeline.to_global(batch, batch_sharding)
    stats = eval_step(params, batch_global)
    if progress is not None:
      progress(int(batch['loss_mask'].sum()))
    if pending is not None:  # fetch the previous batch's sums while this one runs
      for k, v in jax.device_get(pending).items():
        totals[k] += float(v)
    pending = stats
  if pending is not None:
    for k, v in jax.device_get(pending).items():
      totals[k] += float(v)
  tokens = max(totals['tokens'], 1.0)
  return {'loss': totals['nll_sum'] / tokens, 'accuracy': totals['correct'] / tokens, **totals}


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
  n = max(len(data), 1)
  return {
      'gzip -9': 8 * len(gzip.compress(data, compresslevel=9)) / n,
      'xz -9': 8 * len(lzma.compress(data, preset=9)) / n,
  }


def select_documents(docs, tokenizer, max_tokens: int) -> list[str]:
  """Whole documents, in order, until they hold `max_tokens` tokens (at least one document)."""
  chosen, count = [], 0
  for text in sources.texts(docs):
    chosen.append(text)
    count += len(tokenizer.encode(text)) + 1
    if count >= max_tokens:
      break
  return chosen


class _Concat:
  """Documents of several splits as one sequence."""

  def __init__(self, parts):
    self._parts = parts

  def __len__(self) -> int:
    return sum(len(p) for p in self._parts)

  def __getitem__(self, i: int) -> str:
    for p in self._parts:
      if i < len(p):
        return p[i]
      i -= len(p)
    raise IndexError(i)


def open_documents(data_cfg, data: str | None):
  """The run's held-out split, or with `data` every document (both splits) of that source."""
  if not data:
    return sources.open_source(data_cfg, 'heldout')
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.source = data
  if not data.startswith(sources.TFDS_PREFIX):  # whole documents, none cut in two by a split by position
    return sources.open_whole(cfg, data)
  parts, errors = [], []
  for split in sources.SPLITS:
    try:
      parts.append(sources.open_source(cfg, split))
    except UserError as e:  # a small source may have no documents in one split
      errors.append(e)
  if not parts:
    raise errors[0]
  return _Concat(parts)


def evaluate_run(run, data: str | None = None, max_tokens: int | None = None, progress: bool = False) -> dict:
  cfg, tok = run.cfg, run.tokenizer
  max_tokens = max_tokens or cfg.eval.max_tokens
  texts = select_documents(open_documents(cfg.data, data), tok, max_tokens)
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  param_shardings = jax.tree.map(lambda a: a.sharding, run.params)
  eval_step = make_eval_step(run.model, run.mesh, run.rules, param_shardings, batch_sharding)
  batches = pipeline.eval_batches(texts, tok, cfg.data, cfg.data.batch_size, model_cfg=cfg.model, seed=cfg.seed)
  scoring = objectives.of(cfg.data).scoring
  # Masked LM and span corruption score a share of the tokens: the bar counts scored tokens without a total.
  total = sum(len(tok.encode(t)) + 1 for t in texts) if scoring == 'text' else None
  bar = progress_bar(total, 'tokens') if progress else None
  try:
    # Every process reads the same documents into the same whole batches: no process's share runs out first.
    scores = score(eval_step, run.params, batches, batch_sharding,
                   progress=bar.update if bar is not None else None, whole=True)
  finally:
    if bar is not None:
      bar.close()
  data_bytes = b''.join(t.encode('utf-8') for t in texts)
  result = {
      'step': run.step,
      'data': data or f'{cfg.data.source} (held out)',
      'documents': len(texts),
      'bytes': len(data_bytes),
      'tokens': int(scores['tokens']),
      'loss': scores['loss'],
      'token_accuracy': scores['accuracy'],
  }
  if scoring == 'masked':
    # The loss and accuracy of the masked tokens only (the masks drawn from the run's seed, the same at every
    # evaluation); not a likelihood of the text, so no perplexity or bits per byte.
    return {**result, 'masked_tokens': int(scores['tokens']), 'masked_token_loss': scores['loss'],
            'masked_token_accuracy': scores['accuracy']}
  perplexity = math.exp(min(scores['loss'], 700.0))
  if scoring == 'targets':  # of the targets (sentinels and corrupted spans) given the rest
    return {**result, 'target_tokens': int(scores['tokens']), 'perplexity': perplexity}
  return {
      **result,
      'perplexity': perplexity,
      'bits_per_byte': scores['nll_sum'] / math.log(2) / max(len(data_bytes), 1),
      'baselines_bits_per_byte': compressor_bits_per_byte(data_bytes),
  }


def progress_bar(total: int, unit: str):
  """tqdm on standard error, drawn only on a terminal (logs and tests stay clean)."""
  from tqdm import tqdm
  return tqdm(total=total, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr,
              disable=not sys.stderr.isatty())
