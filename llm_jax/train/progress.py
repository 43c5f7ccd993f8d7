"""What a person watching the run sees: a tqdm bar (steps, ETA, loss, tokens/s, MFU) on an interactive
terminal, one plain line per logged step otherwise (logs, CI, `| tee`). Process 0 only."""

from __future__ import annotations

import sys

import jax


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60}:{rest % 60:02d}'


class Progress:

  def __init__(self, start: int, total: int, interactive: bool | None = None):
    self._bar = None
    self._total = total
    self._enabled = jax.process_index() == 0
    interactive = sys.stdout.isatty() if interactive is None else interactive
    if self._enabled and interactive:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, record: dict) -> None:
    if not self._enabled:
      return
    mfu = record.get('mfu')
    if self._bar is not None:
      post = {'loss': f'{record["loss"]:.4f}', 'tok/s': f'{record["tokens_per_sec"]:,.0f}'}
      if mfu is not None:
        post['mfu'] = f'{100 * mfu:.1f}%'
      self._bar.n = step
      self._bar.set_postfix(post, refresh=False)
      self._bar.refresh()
      return
    eta = (self._total - step) * record['step_time']
    line = (f'step {step:>6}  loss {record["loss"]:.4f}  lr {record["learning_rate"]:.2e}  '
            f'{record["tokens_per_sec"]:,.0f} tok/s  {record["step_time"] * 1000:.0f} ms/step')
    if mfu is not None:
      line += f'  MFU {100 * mfu:.1f}%'
    if 'skipped' in record:
      line += f'  skipped {record["skipped"]}'
    print(f'{line}  ETA {_duration(eta)}', flush=True)

  def write(self, msg: str) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
