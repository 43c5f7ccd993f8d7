"""Serving under load: completion tokens/s and latency of `llm-jax serve` on loopback, with and without
continuous batching, on the same model in one run.

    python tools/bench_serve.py --workdir=runs/demo [--clients 1 16 64] [--requests=1024] [--slots=32]

Each configuration starts `llm-jax serve` in a subprocess: `--max_batch=1` (one request decoded at a time: no
batching; the standard-library server this replaced is gone from the tree, so it stands in for "before") and
`--max_batch=SLOTS` (continuous batching). For each number of clients, that many clients send `--requests`
requests between them, back to back, greedy with `ignore_eos`, `max_tokens` drawn from 8, 16, 32, 64, 96
(never past the context), prompts of mixed lengths, after 2 x clients warm-up requests sent the same way
without a pause (so the timed ones meet the server in its steady state, not all arriving at once). One JSON
line per (server, clients):

  tokens_per_sec       completion tokens of the timed requests / their span (first sent to last answered)
  p50_s, p99_s         request latency
  short_p50_s,         median and p99 latency of the 8-token requests (a fifth of them: 1,024 requests give
  short_p99_s          about 200, so the p99 is not just the slowest one), beside `short_alone_s`: an
                       8-token request's median latency with nothing else running
  burst_short_max_s    the slowest of `clients` 8-token requests sent at once to the idle server (every one
                       prefilled before the first decode step): the cost of a synchronized start

With `--rounds=N` every level is measured N times, alternating (the machine's speed drifts between minutes),
then one summary line per (server, clients) gives the medians over the rounds of the throughput, of its ratio
to the first level's in the same round, of the 8-token p99 and of its ratio to that round's time alone.

Without `--workdir`, `--random` builds a Quick-start-shaped run (configs/tiny.py, random params, a tokenizer
trained on the built-in corpus) in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LENGTHS = (8, 16, 32, 64, 96)
WORDS = 'def class import return for while if else print range len self value data list'.split()


def random_workdir(path: str) -> str:
  """configs/tiny.py's default shape with the seed's random params (decode speed does not depend on
  training), beside a tokenizer trained on the built-in corpus."""
  import shutil
  from llm_jax import config as config_lib, sharding
  from llm_jax.data import sources, tokenizer as tokenizer_lib
  from llm_jax.models import build_model
  from llm_jax.run import workdir as workdir_lib
  from llm_jax.run.checkpoint import Checkpointer
  from llm_jax.train import optim
  from llm_jax.train.state import StateFactory, param_logical_specs
  tok_path = os.path.join(path, 'tok.model')
  cfg = config_lib.load('tiny', [('data.tokenizer', tok_path)])
  os.makedirs(path, exist_ok=True)
  tok = tokenizer_lib.train(sources.texts(sources.open_source(cfg.data, 'train')), cfg.model.vocab_size,
                            min(cfg.data.tokenizer_train_chars, 2_000_000), num_threads=2)
  tokenizer_lib.save(tok, tok_path)
  workdir = os.path.join(path, 'run')
  os.makedirs(workdir)
  config_lib.write_json_atomic(cfg, workdir_lib.config_path(workdir))
  shutil.copyfile(tok_path, os.path.join(workdir, workdir_lib.TOKENIZER))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  factory = StateFactory(model, optim.make_optimizer(cfg.train, param_logical_specs(model)), mesh, rules)
  ckpt = Checkpointer(workdir, async_save=False)
  ckpt.save(1, factory.init(cfg.seed), {}, cfg.to_dict())
  ckpt.close()
  return workdir


def start_server(workdir: str, slots: int):
  proc = subprocess.Popen([sys.executable, '-m', 'llm_jax.cli', 'serve', f'--workdir={workdir}', '--port=0',
                           f'--max_batch={slots}', '--batch_wait_ms=0'], stdout=subprocess.PIPE, text=True,
                          cwd=ROOT)
  line = proc.stdout.readline()
  match = re.search(r'(http://[\d.]+:\d+)/v1', line)
  if not match:
    proc.kill()
    raise SystemExit(f'the server did not start: {line!r}')
  return proc, match.group(1)


def make_requests(n: int, context: int, rng: random.Random) -> list[dict]:
  out = []
  for _ in range(n):
    max_tokens = rng.choice([m for m in LENGTHS if m + 24 <= context] or [8])
    prompt = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    out.append({'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True})
  return out


async def load(url: str, requests: list[dict], clients: int) -> tuple[float, list]:
  """`clients` concurrent clients sending `requests` between them, in order, each its next as soon as its last
  is answered: (wall time, one (max_tokens, completion tokens, latency, index in `requests`, time sent) per
  request).
  aiohttp (what vLLM's serving benchmark drives servers with) rather than httpx: the load generator shares the
  two cores with the server, and httpx took three times the CPU per request (a fifth of a core at 16 clients
  against a fifteenth)."""
  import aiohttp
  pending = list(enumerate(requests))[::-1]  # popped from the end: sent in order
  results = []

  async def client(session):
    while pending:
      i, body = pending.pop()
      start = time.perf_counter()
      async with session.post(url + '/v1/completions', json=body) as r:
        r.raise_for_status()
        answer = await r.json()
      results.append((body['max_tokens'], answer['usage']['completion_tokens'], time.perf_counter() - start, i,
                      start))

  connector = aiohttp.TCPConnector(limit=clients)
  async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
    start = time.perf_counter()
    await asyncio.gather(*[client(session) for _ in range(clients)])
    return time.perf_counter() - start, results


def pct(values, q):
  values = sorted(values)
  return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


SHORT = {'prompt': 'def f(x):', 'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}


def measure(url: str, clients: int, requests: int, context: int, rng: random.Random) -> dict:
  """One level in its steady state: the same clients send 2 x clients warm-up requests and then `requests`
  timed ones without a pause between, and only the timed ones' latencies count. The level's first
  `clients` requests arrive at once, all prefilled before the next decode step; counted, the few 8-token
  ones among them were the 8-token p99 of every level (about 3 of 200 samples). That start is measured
  apart: `burst_short_max_s` is the slowest of `clients` 8-token requests sent at once to the idle server.
  Throughput is over the timed requests' span (first sent to last answered)."""
  warm = 2 * clients
  timed = max(requests, clients)
  _, results = asyncio.run(load(url, make_requests(warm + timed, context, rng), clients))
  results = [r for r in results if r[3] >= warm]
  wall = max(r[4] + r[2] for r in results) - min(r[4] for r in results)
  latencies = [r[2] for r in results]
  shorts = [r[2] for r in results if r[0] == 8]
  burst = asyncio.run(load(url, [SHORT] * clients, clients))[1]
  return {'clients': clients, 'requests': len(results),
          'tokens_per_sec': round(sum(r[1] for r in results) / wall, 1), 'p50_s': round(pct(latencies, 0.5), 3),
          'p99_s': round(pct(latencies, 0.99), 3),
          'short_p50_s': round(pct(shorts, 0.5), 3) if shorts else None,  # None: no 8-token request drawn
          'short_p99_s': round(pct(shorts, 0.99), 3) if shorts else None,
          'burst_short_max_s': round(max(r[2] for r in burst), 3)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default=None)
  p.add_argument('--random', action='store_true', help='a random Quick-start-shaped run in a temporary dir')
  p.add_argument('--clients', type=int, nargs='+', default=[1, 16, 64])
  p.add_argument('--requests', type=int, default=1024, help='requests per (server, clients, round)')
  p.add_argument('--slots', type=int, default=32)
  p.add_argument('--rounds', type=int, default=1,
                 help='measure every level this many times, alternating, and print the medians')
  args = p.parse_args()
  if not args.workdir and not args.random:
    raise SystemExit('give --workdir=DIR (a trained run) or --random')
  tmp = tempfile.TemporaryDirectory() if args.random else None
  workdir = args.workdir or random_workdir(tmp.name)
  from llm_jax.run import workdir as workdir_lib
  context = workdir_lib.load_config(workdir).data.seq_len
  rng = random.Random(0)
  for slots in (1, args.slots):
    server = 'no batching (--max_batch=1)' if slots == 1 else f'continuous batching (--max_batch={slots})'
    proc, url = start_server(workdir, slots)
    try:
      asyncio.run(load(url, [SHORT] * 3, 1))
      rounds = []
      for r in range(args.rounds):
        # The machine's speed drifts (a shared VM): each round measures an 8-token request alone and then
        # every level back to back, so a round's ratios compare figures taken minutes, not hours, apart.
        alone = statistics.median(x[2] for x in asyncio.run(load(url, [SHORT] * 7, 1))[1])
        levels = {c: measure(url, c, args.requests, context, rng) for c in args.clients}
        for c, row in levels.items():
          over = round(row['short_p99_s'] / alone, 2) if row['short_p99_s'] is not None else None
          print(json.dumps({'server': server, 'round': r, **row, 'short_alone_s': round(alone, 3),
                            'short_p99_over_alone': over}), flush=True)
        rounds.append((alone, levels))
      if args.rounds > 1:
        one = args.clients[0]
        for c in args.clients:
          shorts = [(lv[c]['short_p99_s'], a) for a, lv in rounds if lv[c]['short_p99_s'] is not None]
          print(json.dumps({
              'server': server, 'clients': c, 'rounds': args.rounds,
              'median_tokens_per_sec': round(statistics.median(lv[c]['tokens_per_sec'] for _, lv in rounds), 1),
              f'median_throughput_over_{one}_client': round(statistics.median(
                  lv[c]['tokens_per_sec'] / lv[one]['tokens_per_sec'] for _, lv in rounds), 2),
              'median_short_p99_s': statistics.median(s for s, _ in shorts) if shorts else None,
              'median_short_p99_over_alone': round(statistics.median(s / a for s, a in shorts), 2) if shorts else None,
          }), flush=True)
    finally:
      proc.terminate()
      proc.wait(timeout=60)
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  main()
