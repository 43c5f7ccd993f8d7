"""Evaluation of a run's latest checkpoint on held-out text: loss, perplexity, bits per byte, and the bits
per byte that general-purpose compressors (gzip -9, xz -9) get on exactly the same bytes, for scale."""

from __future__ import annotations

import gzip
import lzma
import math
from typing import Iterable

import jax
import numpy as np

from llm_jax import inference, sharding
from llm_jax.data import pipeline, sources
from llm_jax.train.step import make_eval_step


def score(eval_step, params, batches: Iterable[dict[str, np.ndarray]], batch_sharding) -> dict:
  """Sum the eval step's statistics over batches; loss is per predicted token."""
  totals = {'nll_sum': 0.0, 'tokens': 0.0, 'correct': 0.0}
  pending = None
  for batch in batches:
    stats = eval_step(params, pipeline.to_global(batch, batch_sharding))
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


def select_heldout(docs, tokenizer, max_tokens: int) -> list[str]:
  """Whole held-out documents, in order, until they hold `max_tokens` tokens (at least one document)."""
  chosen, count = [], 0
  for text in sources.texts(docs):
    chosen.append(text)
    count += len(tokenizer.encode(text)) + 1
    if count >= max_tokens:
      break
  return chosen


def evaluate_workdir(workdir: str) -> dict:
  run = inference.load_run(workdir)
  cfg, tok = run.cfg, run.tokenizer
  texts = select_heldout(sources.open_source(cfg.data, 'heldout'), tok, cfg.eval.max_tokens)
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  param_shardings = jax.tree.map(lambda a: a.sharding, run.params)
  eval_step = make_eval_step(run.model, run.mesh, run.rules, param_shardings, batch_sharding)
  batches = pipeline.eval_batches(texts, tok, cfg.data, cfg.data.batch_size)
  scores = score(eval_step, run.params, batches, batch_sharding)
  data = b''.join(t.encode('utf-8') for t in texts)
  return {
      'step': run.step,
      'documents': len(texts),
      'bytes': len(data),
      'tokens': int(scores['tokens']),
      'loss': scores['loss'],
      'perplexity': math.exp(min(scores['loss'], 700.0)),
      'token_accuracy': scores['accuracy'],
      'bits_per_byte': scores['nll_sum'] / math.log(2) / max(len(data), 1),
      'baselines_bits_per_byte': compressor_bits_per_byte(data),
  }
