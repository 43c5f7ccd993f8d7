"""Decode speed: ms per step and tokens/s of llm-jax's compiled prefill + decode loop, beside the HBM floor.

    python tools/bench_decode.py [--config=bench/llama_1b] [--batch 1 32] [--prompt_len=128]
                                 [--new_tokens=256] [--repeats=3] [--hf_reference]

A model of the config's shape with random parameters decodes greedily, EOS ignored, `new_tokens` tokens after
random `prompt_len`-token prompts. One JSON line per batch size:

  ms_per_step         whole generate call (prefill included) / new_tokens: how the Hugging Face reference
                      (../shared/bench/hf_decode_reference.py) measures, so the two compare directly
  decode_ms_per_step  (whole call - prefill-only call) / (new_tokens - 1): the loop alone
  tokens_per_sec      batch * new_tokens / whole call
  hbm_floor_ms        parameter bytes / measured device copy bandwidth: no decoder step can be faster

`--hf_reference` then runs the Hugging Face reference in the same job (it needs torch + transformers + CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm_jax import config as config_lib, sharding  # noqa: E402
from llm_jax.infer import decode
from llm_jax.models import build_model  # noqa: E402
from llm_jax.infer.sampling import SamplingParams  # noqa: E402
from llm_jax.train.state import init_params, param_shardings  # noqa: E402


def copy_bandwidth(mbytes: int = 1024, repeats: int = 5) -> float:
  """Bytes per second of an elementwise pass over a large device array (read once + written once)."""
  n = mbytes * 2**20 // 4
  x = jnp.zeros((n,), jnp.float32)
  bump = jax.jit(lambda a: a + 1.0)
  x = bump(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    x = bump(x)
  x.block_until_ready()
  return 2 * n * 4 * repeats / (time.perf_counter() - start)


def _timed(engine, requests) -> tuple[float, list]:
  start = time.perf_counter()
  results = engine.generate(requests)  # returns host lists: the device work is finished
  return time.perf_counter() - start, results


def bench(engine, vocab: int, batch: int, prompt_len: int, new_tokens: int, repeats: int, floor_ms: float):
  rng = np.random.default_rng(batch)
  prompts = [tuple(rng.integers(4, vocab, prompt_len).tolist()) for _ in range(batch)]
  full = [decode.Request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
  first = [decode.Request(p, SamplingParams(max_new_tokens=1, ignore_eos=True)) for p in prompts]
  _timed(engine, full)  # compile
  _timed(engine, first)
  totals, prefills = [], []
  for _ in range(repeats):
    dt, results = _timed(engine, full)
    if any(len(r.tokens) != new_tokens for r in results):
      raise RuntimeError('a row did not decode every step: the timing would flatter the loop')
    totals.append(dt)
    prefills.append(_timed(engine, first)[0])
  total, prefill = min(totals), min(prefills)
  return {
      'impl': 'llm-jax', 'batch': batch, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
      'ms_per_step': round(total / new_tokens * 1e3, 3),
      'decode_ms_per_step': round((total - prefill) / max(new_tokens - 1, 1) * 1e3, 3),
      'prefill_ms': round(prefill * 1e3, 3),
      'tokens_per_sec': round(batch * new_tokens / total),
      'hbm_floor_ms': round(floor_ms, 3),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='bench/llama_1b')
  p.add_argument('--batch', type=int, nargs='+', default=[1, 32])
  p.add_argument('--prompt_len', type=int, default=128)
  p.add_argument('--new_tokens', type=int, default=256)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--copy_mbytes', type=int, default=1024, help='size of the bandwidth probe')
  p.add_argument('--hf_reference', action='store_true')
  p.add_argument('--param_dtype', default='bfloat16',
                 help="weights as served (the recipe's float32 master weights are for training)")
  args = p.parse_args(argv)

  cfg = config_lib.load(args.config, [('model.param_dtype', args.param_dtype)])
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  params = jax.jit(lambda k: init_params(model, k), out_shardings=param_shardings(model, mesh, rules))(
      jax.random.PRNGKey(0))
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  bandwidth = copy_bandwidth(args.copy_mbytes)
  floor_ms = param_bytes / bandwidth * 1e3
  device = jax.devices()[0]
  print(json.dumps({'device': getattr(device, 'device_kind', str(device)), 'devices': len(jax.devices()),
                    'jax': jax.__version__, 'config': args.config, 'param_bytes': param_bytes,
                    'copy_GB_per_s': round(bandwidth / 1e9, 1)}), flush=True)
  engine = decode.Engine(model, params, eos_id=-1, mesh=mesh, rules=rules)
  for batch in args.batch:
    print(json.dumps(bench(engine, cfg.model.vocab_size, batch, args.prompt_len, args.new_tokens, args.repeats,
                           floor_ms)), flush=True)
  if args.hf_reference:
    ref = os.path.join(ROOT, '..', 'shared', 'bench', 'hf_decode_reference.py')
    return subprocess.call([sys.executable, ref])
  return 0


if __name__ == '__main__':
  sys.exit(main())
