"""The CPU train step of the Quick start's recipe against PyTorch's, side by side in one run (issue 21).

    python tools/bench_train_cpu.py [--rounds=5] [--bench_dir=../shared/bench] [--no_compile]
                                    [--variant 'NAME:--config.model.scan_layers=True ...' ...]

Each round runs, one process after the other: the PyTorch reference of the `tiny` recipe's shape
($BENCH_DIR/torch_cpu_reference.py: eager, then torch.compile unless --no_compile), then
`tools/bench_train.py --config=tiny` as shipped, then each --variant (ours with overrides). Alternating the
processes spreads whatever else the machine does over all of them; the summary is each one's median step time
over the rounds and the ratio reference / ours (above 1: ours is faster). One JSON line per process run, then
one per implementation with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(stdout: str) -> dict | None:
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  return json.loads(lines[-1]) if lines else None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=30, help="our timed steps per run (the reference times 60)")
  p.add_argument('--bench_dir', default=os.path.join(ROOT, '..', 'shared', 'bench'))
  p.add_argument('--no_compile', action='store_true', help='skip the torch.compile reference')
  p.add_argument('--variant', action='append', default=[], metavar="'NAME:OVERRIDES'",
                 help='also time ours with these space-separated bench_train.py overrides')
  args = p.parse_args(argv)
  reference = os.path.join(args.bench_dir, 'torch_cpu_reference.py')
  if not os.path.exists(reference):
    raise SystemExit(f'bench_train_cpu: {reference} not found (--bench_dir: a copy of ../shared/bench)')
  runs = [('torch eager', [sys.executable, reference])]
  if not args.no_compile:
    runs.append(('torch.compile', [sys.executable, reference, 'compile']))
  ours = [sys.executable, os.path.join(ROOT, 'tools', 'bench_train.py'), '--config=tiny', f'--steps={args.steps}']
  runs.append(('llm-jax tiny', ours))
  for spec in args.variant:
    name, _, overrides = spec.partition(':')
    runs.append((f'llm-jax {name}', ours + overrides.split()))
  times: dict[str, list[float]] = {name: [] for name, _ in runs}
  for r in range(args.rounds):
    for name, cmd in runs:
      done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
      row = _last_json(done.stdout)
      if done.returncode or row is None:
        print(json.dumps({'round': r, 'impl': name, 'error': f'exit {done.returncode}',
                          'stderr': done.stderr[-400:]}), flush=True)
        continue
      times[name].append(row['step_ms'])
      keep = {k: row[k] for k in ('step_ms', 'cpu_ms', 'cores_busy', 'tokens_per_sec') if k in row}
      print(json.dumps({'round': r, 'impl': name, **keep}), flush=True)
  eager = statistics.median(times['torch eager']) if times['torch eager'] else None
  for name, values in times.items():
    if not values:
      continue
    median = statistics.median(values)
    print(json.dumps({'impl': name, 'median_step_ms': round(median, 1), 'runs_ms': values,
                      'torch_eager_over_this': round(eager / median, 3) if eager else None}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
