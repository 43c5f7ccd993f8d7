"""Input-pipeline throughput: tokens/s of packed training batches, (a) streamed from text with sentencepiece
tokenization and packing, (b) read from pre-tokenized ArrayRecord shards written by `llm-jax prepare`, and
(c) streamed from Parquet (the same documents, read by row group) with tokenization and packing.

    .venv/bin/python tools/bench_data.py [--source=builtin] [--workers=0,1,2] [--seconds=20]

Tokens are counted as the batch's row slots (batch_size x seq_len): what the accelerator is fed. The
tokenizer (4096 pieces) is trained on the source first, (b) prepares the source into a temporary
directory and (c) writes its training split as Parquet files (row groups of --row_group rows); none of
this is timed. Results go in BENCHMARKS.md with the machine, date and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax import config as config_lib  # noqa: E402
from llm_jax.data import pipeline, prepared, sources, tokenizer as tokenizer_lib  # noqa: E402


def _cpu_seconds() -> float:
  """CPU time of this process and its live worker processes (psutil comes with tensorflow-datasets)."""
  import psutil
  me = psutil.Process()
  procs = [me] + me.children(recursive=True)
  total = 0.0
  for p in procs:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def measure(data_cfg, tok, seconds: float, warmup_batches: int = 2) -> tuple[float, int, float]:
  """tokens/s, batches, and the cores the pipeline had on average (2.0 is the whole machine)."""
  stream = pipeline.TrainStream(data_cfg, tok, seed=0, process_index=0, process_count=1)
  try:
    for _ in range(warmup_batches):
      next(stream)
    start, batches, cpu = time.perf_counter(), 0, _cpu_seconds()
    while time.perf_counter() - start < seconds:
      next(stream)
      batches += 1
    elapsed = time.perf_counter() - start
    cores = (_cpu_seconds() - cpu) / elapsed
  finally:
    stream.close()
  return batches * data_cfg.batch_size * data_cfg.seq_len / elapsed, batches, cores


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--source', default='builtin')
  p.add_argument('--seq_len', type=int, default=2048)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--shards', type=int, default=8)
  p.add_argument('--workers', default='0,1,2', help='comma-separated worker counts to try')
  p.add_argument('--prefetch', type=int, default=16, help="data.prefetch (the config's default)")
  p.add_argument('--vocab_size', type=int, default=4096)
  p.add_argument('--seconds', type=float, default=20.0)
  p.add_argument('--row_group', type=int, default=64, help='(c): rows per Parquet row group')
  p.add_argument('--only', choices=('text', 'prepared', 'parquet'), default=None)
  args = p.parse_args()

  base = [('data.source', args.source), ('data.seq_len', str(args.seq_len)),
          ('data.batch_size', str(args.batch_size)), ('data.shards', str(args.shards)),
          ('data.prefetch', str(args.prefetch)), ('model.vocab_size', str(args.vocab_size))]
  cfg = config_lib.load(None, base)
  t = time.perf_counter()
  tok = tokenizer_lib.train(sources.texts(sources.open_source(cfg.data, 'train')), args.vocab_size,
                            cfg.data.tokenizer_train_chars)
  print(f'# tokenizer: {tok.vocab_size} pieces, trained in {time.perf_counter() - t:.1f}s (not timed below)')
  print(f'# {platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at start; '
        f'python {platform.python_version()}; seq_len {args.seq_len}, batch {args.batch_size}, '
        f'shards {args.shards}')
  workers = [int(w) for w in args.workers.split(',')]
  if args.only in (None, 'text'):
    for w in workers:
      data_cfg = config_lib.load(None, base + [('data.workers', str(w))]).data
      rate, n, cores = measure(data_cfg, tok, args.seconds)
      print(f'(a) text + sentencepiece + packing, workers={w}: {rate:,.0f} tokens/s ({n} batches; '
            f'{cores:.2f} cores busy, {rate / max(cores, 1e-9):,.0f} tokens per core-second)', flush=True)
  if args.only in (None, 'prepared'):
    with tempfile.TemporaryDirectory() as tmp:
      t = time.perf_counter()
      info = prepared.prepare(cfg.data, tok, tmp, 'bench')
      print(f'# prepared {info["documents"]:,} documents, {info["tokens"]:,} tokens in '
            f'{time.perf_counter() - t:.1f}s (not timed below)', flush=True)
      for w in workers:
        data_cfg = config_lib.load(None, base + [('data.source', f'tfds:{info["path"]}'),
                                                 ('data.workers', str(w))]).data
        rate, n, cores = measure(data_cfg, tok, args.seconds)
        print(f'(b) prepared ArrayRecord + packing, workers={w}: {rate:,.0f} tokens/s ({n} batches; '
              f'{cores:.2f} cores busy, {rate / max(cores, 1e-9):,.0f} tokens per core-second)', flush=True)
  if args.only in (None, 'parquet'):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with tempfile.TemporaryDirectory() as tmp:
      texts = list(sources.texts(sources.open_source(cfg.data, 'train')))
      half = len(texts) // 2
      for i, part in enumerate((texts[:half], texts[half:])):
        pq.write_table(pa.table({'text': part}), os.path.join(tmp, f'part-{i}.parquet'), row_group_size=args.row_group)
      print(f'# wrote {len(texts):,} training documents as Parquet (2 files, row groups of {args.row_group}; '
            'not timed below)', flush=True)
      for w in workers:
        # heldout_percent 0: the files hold the training split already.
        data_cfg = config_lib.load(None, base + [('data.source', os.path.join(tmp, '*.parquet')),
                                                 ('data.heldout_percent', '0'), ('eval.every', '0'),
                                                 ('data.workers', str(w))]).data
        rate, n, cores = measure(data_cfg, tok, args.seconds)
        print(f'(c) Parquet + sentencepiece + packing, workers={w}: {rate:,.0f} tokens/s ({n} batches; '
              f'{cores:.2f} cores busy, {rate / max(cores, 1e-9):,.0f} tokens per core-second)', flush=True)
  print(f'# load average {os.getloadavg()[0]:.2f} at end')


if __name__ == '__main__':
  main()
