"""Retrieval speed on this machine: passages embedded per second by an encoder run, and query latency of the
exact device search at index sizes.

    python tools/bench_index.py --embedder=WORKDIR [--passages=512] [--passage_tokens=128]
                                [--sizes 10000 100000] [--queries=50] [--batch_queries=16]

Embedding: `--passages` passages of `--passage_tokens` tokens cut from the built-in corpus (the standard
library's sources), embedded as `llm-jax index` does (batches of 64, after one warm-up batch). The rate
does not depend on the index size, so it is measured on a sample rather than by embedding 100k passages.

Search: an index of each size of unit vectors of the embedder's width (random: the search costs the same
whatever the vectors hold), on the embedder's mesh. Query latency is one query's embedding plus its top-10
search (median of `--queries`), then the search alone, and the search of a batch of `--batch_queries`.
One JSON line per size; the device count, load average and versions are in each line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm_jax.infer import inference  # noqa: E402
from llm_jax.retrieval import embeddings, index as index_lib, passages as passages_lib  # noqa: E402


def _sample_passages(run, count: int, size: int) -> list[list[int]]:
  from llm_jax.data import sources
  rows = []
  for _, path in sources.builtin_files():
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    for _, ids in passages_lib.cut(run.tokenizer, path, text, size, size // 4):
      rows.append(ids)
      if len(rows) == count:
        return rows
  return rows


def _median_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))
  return statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--embedder', required=True)
  p.add_argument('--passages', type=int, default=512)
  p.add_argument('--passage_tokens', type=int, default=128)
  p.add_argument('--sizes', type=int, nargs='+', default=[10_000, 100_000])
  p.add_argument('--queries', type=int, default=50)
  p.add_argument('--batch_queries', type=int, default=16)
  args = p.parse_args(argv)
  run = inference.load_run(args.embedder)
  embedder = embeddings.Embedder(run, batch_size=64)
  size = min(args.passage_tokens, embedder.room)
  rows = [embedder.wrap(ids) for ids in _sample_passages(run, args.passages + 64, size)]
  embedder.embed_ids(rows[:64])  # compile the lengths used
  start = time.perf_counter()
  embedder.embed_ids(rows[64:])
  rate = (len(rows) - 64) / (time.perf_counter() - start)
  common = {'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}', 'cpus': os.cpu_count(),
            'load_average': round(os.getloadavg()[0], 1), 'jax': jax.__version__, 'embedder': args.embedder,
            'dim': embedder.dim, 'passage_tokens': size}
  print(json.dumps({**common, 'passages_embedded_per_sec': round(rate, 1), 'sample': len(rows) - 64}), flush=True)
  rng = np.random.default_rng(0)
  query = 'How does the tokenizer split a word into pieces?'
  for n in args.sizes:
    v = rng.normal(size=(n, embedder.dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    searcher = index_lib.Searcher(v, run.mesh)
    q1 = embedder([query])
    qb = v[:args.batch_queries] + 0.01
    searcher.search(q1, 10), searcher.search(qb, 10)  # compile
    end_to_end = _median_ms(lambda: searcher.search(embedder([query]), 10), args.queries)
    search_only = _median_ms(lambda: searcher.search(q1, 10), args.queries)
    batch = _median_ms(lambda: searcher.search(qb, 10), max(args.queries // 5, 3))
    print(json.dumps({**common, 'passages': n, 'index_mb': round(v.nbytes / 2**20, 1),
                      'query_ms': round(end_to_end, 2), 'search_ms': round(search_only, 2),
                      f'search_{args.batch_queries}_queries_ms': round(batch, 2)}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
