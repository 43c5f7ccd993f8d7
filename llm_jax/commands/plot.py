"""`llm-jax plot`: train and held-out loss, and tokens/s, of one or more runs in one PNG.

Reads nothing but each run's WORKDIR/metrics.jsonl. A resumed run may have logged some steps twice (those
after its last checkpoint before the interruption); the later record of a step wins, as it is the one the
run's current state descends from.
"""

from __future__ import annotations

import json
import os

from llm_jax import atomic, storage
from llm_jax.commands.common import no_overrides, nonempty
from llm_jax.errors import UserError

HELP = 'draw train / held-out loss and tokens/s of one or more runs into a PNG'


def add_arguments(p) -> None:
  p.add_argument('--workdir', action='append', required=True, help='a run; repeat the flag to compare runs')
  p.add_argument('--out', default='loss.png', help='the PNG to write (default loss.png)')


def read_metrics(workdir: str) -> dict[str, dict[int, dict]]:
  """{'train': {step: record}, 'eval': {step: record}} of a run; one-line errors for what is missing."""
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.exists(workdir):
    raise UserError(f'workdir {workdir} does not exist')
  if not storage.isdir(workdir):
    raise UserError(f'workdir {workdir} is not a directory')
  if not storage.isfile(path):
    raise UserError(f'workdir {workdir} has no metrics.jsonl (not an llm-jax run, or not trained yet)')
  series: dict[str, dict[int, dict]] = {'train': {}, 'eval': {}}
  with storage.open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        series.setdefault(record['split'], {})[int(record['step'])] = record
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        if line.endswith('\n'):  # a last line without newline is a write in progress: skip it
          raise UserError(f'{path}:{lineno}: not a metrics record') from None
  if not series['train'] and not series['eval']:
    raise UserError(f'{path} holds no metrics yet')
  return series


def _labels(workdirs: list[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
  return [w if names.count(n) > 1 else n for n, w in zip(names, workdirs)]


def plot(workdirs: list[str], out: str) -> None:
  runs = [read_metrics(w) for w in workdirs]  # every error before anything is drawn or written
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise UserError(f'--out={out}: directory {out_dir} does not exist')
  try:
    import matplotlib
  except ImportError:
    raise UserError("llm-jax plot needs matplotlib: pip install 'llm-jax[plot]'") from None
  matplotlib.use('Agg')  # files only: no display needed, none opened
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                          gridspec_kw={'height_ratios': [3, 1.2]})
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, series) in enumerate(zip(_labels(workdirs), runs)):
    color = colors[i % len(colors)]
    train = sorted(series['train'].items())
    evals = sorted(series['eval'].items())
    if train:
      ax_loss.plot([s for s, _ in train], [r['loss'] for _, r in train], color=color, lw=1.2,
                   label=f'{label} train')
      speed = [(s, r['tokens_per_sec']) for s, r in train if r.get('tokens_per_sec') is not None]
      ax_speed.plot([s for s, _ in speed], [v for _, v in speed], color=color, lw=1.2, label=label)
    if evals:
      ax_loss.plot([s for s, _ in evals], [r['loss'] for _, r in evals], color=color, lw=1.2, ls='--',
                   marker='o', ms=3, label=f'{label} held-out')
  ax_loss.set_ylabel('loss (nats / token)')
  ax_loss.grid(alpha=0.3)
  ax_loss.legend(fontsize='small')
  ax_speed.set_ylabel('tokens / s')
  ax_speed.set_xlabel('step')
  ax_speed.grid(alpha=0.3)
  ax_loss.set_title('llm-jax: ' + ', '.join(_labels(workdirs)), fontsize='medium')
  fig.tight_layout()
  try:
    with atomic.replacing(out, 'wb') as f:
      fig.savefig(f, format='png', dpi=110)
  except OSError as e:
    raise UserError(f'cannot write {out}: {e.strerror}') from None
  finally:
    plt.close(fig)


def run(args, overrides) -> int:
  no_overrides('plot', overrides)
  for workdir in args.workdir:
    nonempty('--workdir', workdir)
  nonempty('--out', args.out)
  plot(args.workdir, args.out)
  print(f'wrote {args.out}')
  return 0
