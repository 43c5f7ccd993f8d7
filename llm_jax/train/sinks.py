"""Where logged metrics go: WORKDIR/metrics.jsonl always, TensorBoard event files under WORKDIR/tensorboard/
unless `train.tensorboard` is off, and Weights & Biases when `train.wandb_project` is set (wandb is imported
only then). Process 0 writes; the others hold no sinks.

A record is {'step': int, 'split': 'train' | 'eval', metric: number or None, ...}; None (MFU on a CPU) is
written as null to metrics.jsonl and left out of TensorBoard and W&B, which have no "unknown".
"""

from __future__ import annotations

import contextlib
import hashlib

import jax

from llm_jax import storage
from llm_jax.train import tensorboard
from llm_jax.run import workdir as workdir_lib
from llm_jax.errors import UserError

TENSORBOARD_DIR = 'tensorboard'


def _numbers(record: dict) -> dict[str, float]:
  return {f'{record["split"]}/{k}': float(v) for k, v in record.items()
          if k not in ('step', 'split') and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Wandb:

  def __init__(self, project: str, workdir: str, config: dict):
    try:
      import wandb
    except ImportError:
      raise UserError(f'config key train.wandb_project={project!r} asks for Weights & Biases, but wandb is '
                      'not installed (pip install wandb)') from None
    # The same workdir is the same W&B run: a resumed run continues its curves instead of starting anew.
    run_id = hashlib.sha1(storage.absolute(workdir).encode()).hexdigest()[:16]
    # wandb keeps its files in a local directory: a workdir at a URL leaves them in wandb's default (./wandb).
    self._run = wandb.init(project=project, name=storage.basename(storage.absolute(workdir)), id=run_id,
                           resume='allow', config=config, dir=storage.local_path(workdir))

  def write(self, record: dict) -> None:
    self._run.log(_numbers(record), step=record['step'])

  def close(self) -> None:
    self._run.finish()


class _TensorBoard:

  def __init__(self, logdir: str):
    self._writer = tensorboard.EventWriter(logdir)

  def write(self, record: dict) -> None:
    self._writer.scalars(record['step'], _numbers(record))

  def close(self) -> None:
    self._writer.close()


class Sinks:

  def __init__(self, workdir: str, train_cfg, config: dict):
    self._sinks = []
    self._workdir = workdir
    if jax.process_index() != 0:
      return
    with self._io():
      self._sinks.append(workdir_lib.MetricsWriter(workdir))
      if train_cfg.tensorboard:
        self._sinks.append(_TensorBoard(storage.join(workdir, TENSORBOARD_DIR)))
    if train_cfg.wandb_project:
      self._sinks.append(_Wandb(train_cfg.wandb_project, workdir, config))

  @contextlib.contextmanager
  def _io(self):
    """A full disk or a workdir gone read-only is one line, not a traceback from deep in a writer."""
    try:
      yield
    except OSError as e:
      raise UserError(f'cannot write metrics to {self._workdir}: {e.strerror or e}') from None

  def write(self, record: dict) -> None:
    with self._io():
      for sink in self._sinks:
        sink.write(record)

  def close(self) -> None:
    sinks, self._sinks = self._sinks, []
    failure = None
    for sink in sinks:  # every sink gets closed, even after one fails
      try:
        if hasattr(sink, 'close'):
          sink.close()
      except OSError as e:
        failure = failure or e
    if failure is not None:
      with self._io():
        raise failure
