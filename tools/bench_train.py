"""Training-step speed: compile time, step time, tokens/s and MFU of the real train step, one JSON line per run.

    python tools/bench_train.py --config=bench/llama_1b [--steps=30] [--warmup=5] [--windows=3]
                                [--xla_flags=NAME] [--name=LABEL] [--config.model.remat=full ...]
    python tools/bench_train.py --lower_only --config=...      # XLA's FLOPs and memory plan, nothing runs
    python tools/bench_train.py --ratio OURS.jsonl REFERENCE.jsonl   # ours / torch reference, per shape

The step is the one `llm-jax train` runs (train/step.py:setup_train_step: config -> mesh -> state factory ->
jit with shardings and the state donated), on synthetic tokens made on the device once, so no input work is
measured. After `--warmup` steps, `--steps` steps run in `--windows` windows; the host waits for the device
only at the end of a window, and the step time is the median over windows of window time / steps.

MFU counts FLOPs as the torch reference does (../shared/bench/torch_reference.py, llm_jax/models/flops.py):
(6 x matmul parameters + 12 x layers x d x seq) per token, over the device's dense bf16 peak (989 TFLOP/s
for an H100 SXM). `--xla_flags` names a set of XLA GPU flags (XLA_FLAG_SETS) put into XLA_FLAGS before JAX
starts, so it only works with this file run as its own process. tools/bench_train_gpu.sh runs the whole
GPU comparison and the sweep of levers in one job (BENCHMARKS.md says how).
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

# Flags that exist in XLA as shipped with jax 0.10.2 and 0.11.2 (an unknown flag in XLA_FLAGS aborts the
# process, so every name here was checked against both jaxlibs: BENCHMARKS.md). GPU-only: the CPU ignores them.
XLA_FLAG_SETS = {
    'none': (),
    # Overlap independent work (the optimizer update of one layer with the next layer's matmuls, copies)
    # by scheduling for latency; MaxText and the JAX GPU performance guide turn it on.
    'lhs': ('--xla_gpu_enable_latency_hiding_scheduler=true',),
    # Also run the scanned layers' while loop from CUDA graphs more eagerly and with the loop body
    # double-buffered, to cut per-layer launch gaps.
    'lhs_graphs': ('--xla_gpu_enable_latency_hiding_scheduler=true',
                   '--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN',
                   '--xla_gpu_enable_while_loop_double_buffering=true'),
    # cuBLAS for every matmul instead of Triton-generated GEMM fusions (a common win on H100 at these sizes).
    'no_triton_gemm': ('--xla_gpu_enable_triton_gemm=false',),
    'lhs_no_triton_gemm': ('--xla_gpu_enable_latency_hiding_scheduler=true', '--xla_gpu_enable_triton_gemm=false'),
}

# Our recipes' names for the torch reference's shapes.
REFERENCE_SHAPES = {'gpt2_124m': 'gpt124m', 'llama_1b': 'llama1b'}
H100_PEAK = 989e12


def reference_flops_per_token(L: int, d: int, T: int, V: int, ffn: int, gated: bool) -> tuple[int, int]:
  """The reference's formula written out (torch_reference.py:flops_per_token): (FLOPs per token, N)."""
  n = L * (4 * d * d + (3 if gated else 2) * d * ffn) + d * V
  return 6 * n + 12 * L * d * T, n


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='bench/gpt2_124m')
  p.add_argument('--steps', type=int, default=30, help='timed steps, over all windows')
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--windows', type=int, default=3)
  p.add_argument('--xla_flags', default='none', choices=sorted(XLA_FLAG_SETS))
  p.add_argument('--name', default='', help='a label copied into the JSON line (the sweep names its runs)')
  p.add_argument('--lower_only', action='store_true', help="compile abstract inputs: XLA's cost and memory")
  p.add_argument('--op_profile', type=int, default=0, metavar='STEPS',
                 help='after timing, trace STEPS more steps with the JAX profiler and add where the time went '
                      '(milliseconds per step by part of the model and by kind of XLA op) to the JSON line')
  p.add_argument('--ratio', nargs=2, metavar=('OURS', 'REFERENCE'), help='JSON-lines files to compare')
  args, extra = p.parse_known_args(argv)
  from llm_jax.cli import split_config_overrides
  return args, split_config_overrides(extra)


def _shape_name(spec: str) -> str:
  return os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]


def ratios(ours: list[dict], reference: list[dict]) -> list[dict]:
  """Per reference shape: the first of our runs on it without overrides or flags (the recipe as shipped)
  and the best of all our runs, each over the reference's step time (tokens/s and MFU ratios alike)."""
  out = []
  for ref in reference:
    runs = [r for r in ours if r.get('reference_shape') == ref.get('shape') and r.get('step_ms')]
    if not runs or not ref.get('step_ms'):
      continue
    shipped = next((r for r in runs if not r['overrides'] and r['xla_flags'] == 'none'), runs[0])
    best = min(runs, key=lambda r: r['step_ms'])
    out.append({'shape': ref['shape'], 'reference_mfu': ref.get('mfu'), 'reference_step_ms': ref['step_ms'],
                'ours_mfu': shipped.get('mfu'), 'ours_step_ms': shipped['step_ms'],
                'ratio': round(ref['step_ms'] / shipped['step_ms'], 3),
                'best_name': best.get('name'), 'best_mfu': best.get('mfu'), 'best_step_ms': best['step_ms'],
                'best_ratio': round(ref['step_ms'] / best['step_ms'], 3)})
  return out


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      if line.startswith('{'):
        rows.append(json.loads(line))
  return rows


def _set_xla_flags(name: str) -> None:
  flags = XLA_FLAG_SETS[name]
  if not flags:
    return
  if 'jax' in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      raise SystemExit('bench_train: --xla_flags needs a fresh process (JAX already started here)')
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '')] + list(flags)).strip()


def main(argv=None) -> int:
  args, overrides = _parse(argv)
  if args.ratio:
    for row in ratios(_read_jsonl(args.ratio[0]), _read_jsonl(args.ratio[1])):
      print(json.dumps(row), flush=True)
    return 0
  _set_xla_flags(args.xla_flags)
  from llm_jax import config as config_lib  # after XLA_FLAGS: the backend reads them when it starts
  cfg = config_lib.load(args.config, overrides)
  record = _measure(cfg, args)
  shape = _shape_name(args.config)
  record = {'impl': 'llm-jax', 'name': args.name or shape, 'shape': shape,
            'reference_shape': REFERENCE_SHAPES.get(shape) if ':' not in args.config else None,
            'config': args.config, 'overrides': dict(overrides), 'xla_flags': args.xla_flags, **record}
  print(json.dumps(record), flush=True)
  return 0


def _synthetic_batch(cfg, batch_sharding):
  import jax
  import jax.numpy as jnp
  B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size

  def make(rng):
    tokens_BT = jax.random.randint(rng, (B, T + 1), 0, V, dtype=jnp.int32)
    ones_BT = jnp.ones((B, T), jnp.int32)
    return {'inputs': tokens_BT[:, :-1], 'targets': tokens_BT[:, 1:], 'loss_mask': ones_BT,
            'segment_ids': ones_BT, 'positions': jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}

  return make, jax.jit(make, out_shardings=batch_sharding)


def _measure(cfg, args) -> dict:
  import jax
  from llm_jax import sharding
  from llm_jax.models import flops
  from llm_jax.errors import UserError
  from llm_jax.train.step import setup_train_step

  if cfg.model.family != 'decoder':
    raise UserError(f'bench_train times causal decoders; model.family={cfg.model.family!r}')
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.data.seq_len, mesh, rules, cfg.train.microbatches)
  setup = setup_train_step(cfg, mesh, rules)
  make, make_batch = _synthetic_batch(cfg, setup.batch_sharding)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  devices = jax.devices()
  fpt = flops.flops_per_token(cfg.model, T)
  from llm_jax.train.plan import attention_on
  out = {'device': devices[0].device_kind, 'devices': len(devices), 'jax': jax.__version__,
         'batch': B, 'seq_len': T, 'tokens_per_step': B * T, 'matmul_params': flops.matmul_params(cfg.model),
         'flops_per_token': fpt,
         # The kernel model.attention_impl runs here (models/attention_kernels.py: 'auto' is pallas_gpu on GPU).
         'attention_impl': attention_on(cfg, mesh, rules, devices[0].platform)[0]}

  start = time.perf_counter()
  if args.lower_only:
    abstract_batch = jax.eval_shape(make, jax.random.PRNGKey(0))
    abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.batch_sharding),
                                  abstract_batch)
    compiled = setup.step.lower(setup.factory.abstract_sharded(), abstract_batch).compile()
    out['compile_s'] = round(time.perf_counter() - start, 2)
    out.update(_xla_analysis(compiled, B * T * fpt))
    return out

  state = setup.factory.init(cfg.seed)
  batch = make_batch(jax.random.PRNGKey(1))
  jax.block_until_ready((state, batch))
  start = time.perf_counter()
  compiled = setup.step.lower(state, batch).compile()
  out['compile_s'] = round(time.perf_counter() - start, 2)
  out.update(_xla_analysis(compiled, B * T * fpt))
  # What model.attention_impl='auto' chose, read from the compiled program: cuDNN's fused attention is a
  # custom call named __cudnn$fmha...
  out['cudnn_attention'] = 'cudnn$fmha' in compiled.as_text()
  start = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  out['first_step_s'] = round(time.perf_counter() - start, 3)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  windows = max(1, args.windows)
  per_window = max(1, args.steps // windows)
  window_ms, cpu_ms = [], []
  for _ in range(windows):
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(per_window):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    window_ms.append((time.perf_counter() - start) * 1e3 / per_window)
    cpu_ms.append((time.process_time() - cpu_start) * 1e3 / per_window)
  step_ms = statistics.median(window_ms)
  tokens_per_sec = B * T / (step_ms / 1e3)
  peak = flops.device_peak_flops(devices)
  mfu = flops.mfu(tokens_per_sec, fpt, len(devices), peak)
  out.update({'step_ms': round(step_ms, 3), 'window_ms': [round(w, 3) for w in window_ms],
              'timed_steps': per_window * windows,
              # CPU time this process used per step (all its threads): over step_ms, how many cores were busy.
              # Less disturbed than wall time by other work on a shared machine.
              'cpu_ms': round(statistics.median(cpu_ms), 3),
              'cores_busy': round(statistics.median(c / w for c, w in zip(cpu_ms, window_ms)), 2), 'tokens_per_sec': round(tokens_per_sec),
              'peak_flops': peak, 'mfu': None if mfu is None else round(mfu, 4),
              'loss': round(float(metrics['loss']), 4)})
  if args.op_profile:
    out['op_profile'] = _op_profile(compiled, state, batch, args.op_profile)
  stats = getattr(devices[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_memory_gib'] = round(stats['peak_bytes_in_use'] / 2**30, 2)
  return out


def _op_profile(compiled, state, batch, steps: int) -> dict:
  """Milliseconds per step of the compiled step's ops, as the profiler's trace times them, summed by the part
  of the model their HLO metadata names (attention, MLP, norms, the output projection and loss, the optimizer)
  and forward or backward, and by kind of XLA op (fusion kinds; a dot or a library call is a matmul). Ops that
  run at the same time both count, so the sums can exceed the step's wall time; the gap below it is time no
  op was running (waits between ops)."""
  import collections
  import glob
  import gzip
  import re
  import tempfile
  import jax
  meta = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if m:
      meta[m.group(1)] = m.group(2)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    trace = json.load(gzip.open(glob.glob(os.path.join(d, '**', '*perfetto_trace.json.gz'), recursive=True)[0]))
  by_part, by_kind = collections.Counter(), collections.Counter()
  for e in trace['traceEvents'] if isinstance(trace, dict) else trace:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name not in meta or name.startswith(('while', 'conditional', 'call')):
      continue  # a loop's or call's own event spans the ops inside it, which count themselves
    op = meta[name]
    where = next((part for key, part in (('/attn', 'attention'), ('norm', 'norms'), ('/mlp', 'mlp'),
                                         ('BTV', 'output and loss'), ('Decoder', 'other model')) if key in op),
                 'loss and optimizer')
    by_part[f'{where} ({"backward" if "transpose(" in op else "forward"})'] += e['dur']
    kind = re.sub(r'\.\d+$', '', name)
    by_kind['matmul' if kind in ('dot', 'ynn_fusion', 'xnn_fusion') else kind] += e['dur']
  per_step = lambda c: {k: round(v / steps / 1e3, 2) for k, v in c.most_common(12)}  # noqa: E731
  return {'steps': steps, 'by_part_ms': per_step(by_part), 'by_kind_ms': per_step(by_kind),
          'ops_ms': round(sum(by_part.values()) / steps / 1e3, 1)}


def _xla_analysis(compiled, model_flops_per_step: float) -> dict:
  """XLA's own count of the compiled step's FLOPs (against the model's: recomputation and attention's
  masked half show up here) and its memory plan; either may be missing on some backends."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get('flops'):
      out['xla_flops_per_step'] = float(cost['flops'])
      out['xla_over_model_flops'] = round(float(cost['flops']) / model_flops_per_step, 3)
  except Exception:  # noqa: BLE001 (an analysis the backend lacks is not a failed benchmark)
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      out['xla_temp_gib'] = round(mem.temp_size_in_bytes / 2**30, 3)
      out['xla_argument_gib'] = round(mem.argument_size_in_bytes / 2**30, 3)
  except Exception:  # noqa: BLE001
    pass
  return out


if __name__ == '__main__':
  try:
    sys.exit(main())
  except Exception as e:  # a user mistake (bad config key) as one line, like the CLI
    from llm_jax.errors import UserError
    if isinstance(e, UserError):
      print(f'bench_train: error: {e}', file=sys.stderr)
      sys.exit(2)
    raise
