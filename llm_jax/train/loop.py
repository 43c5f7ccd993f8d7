"""The training loop: resume or init, step, log one step late, evaluate, checkpoint.

The host never waits on the device in the hot loop: step s+1 is dispatched before step s's metrics are
fetched, so the fetch overlaps with device work (nanodo's pattern).
"""

from __future__ import annotations

import math
import sys
import time

import jax

from llm_jax import evaluate, sharding, workdir as workdir_lib
from llm_jax.checkpoint import Checkpointer
from llm_jax.data import pipeline, sources
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory
from llm_jax.train.step import make_eval_step, make_train_step


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _Progress:
  """A tqdm bar on an interactive terminal, plain lines otherwise (logs, CI); process 0 only."""

  def __init__(self, start: int, total: int):
    self._bar = None
    self._enabled = jax.process_index() == 0
    if self._enabled and sys.stdout.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, record: dict) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f'{record["loss"]:.4f}', tok_s=f'{record["tokens_per_sec"]:.0f}',
                            refresh=False)
      self._bar.refresh()
    else:
      print(f'step {step:>6}  loss {record["loss"]:.4f}  lr {record["learning_rate"]:.2e}  '
            f'{record["tokens_per_sec"]:,.0f} tok/s  {record["step_time"] * 1000:.0f} ms/step', flush=True)

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


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Train `cfg` in `workdir` until cfg.train.steps, resuming from its latest checkpoint if any.

  `stop_at` ends this invocation early (with a checkpoint) without changing the run itself: the schedule
  still runs to cfg.train.steps, so a later invocation continues the same run.
  """
  workdir_lib.prepare(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.data.seq_len, mesh, rules)
  tok = workdir_lib.tokenizer_for_training(workdir, cfg)

  train_model = build_model(cfg.model, deterministic=cfg.model.dropout_rate == 0.0)
  eval_model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train)
  lr_schedule = optim.schedule(cfg.train)
  factory = StateFactory(train_model, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  stream = pipeline.TrainStream(cfg.data, tok, seed=cfg.seed)

  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, factory.abstract_sharded())
    stream.set_state(data_state)
    _say(f'resumed from step {latest} of {workdir}')
  else:
    state = factory.init(cfg.seed)
  start, total = (latest or 0), cfg.train.steps
  end = total if stop_at is None else min(stop_at, total)
  if start >= end:
    _say(f'{workdir} is already at step {start} of {total}; nothing to do')
    ckpt.close()
    stream.close()
    return {'step': start}

  train_step = make_train_step(train_model, tx, lr_schedule, mesh, rules, factory.shardings, batch_sharding)
  eval_step = make_eval_step(eval_model, mesh, rules, factory.param_shardings, batch_sharding)
  heldout = sources.open_source(cfg.data, 'heldout') if cfg.eval.every else None
  writer = workdir_lib.MetricsWriter(workdir)
  config_json = cfg.to_dict()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  progress = _Progress(start, total)
  _say(f'training {end - start} steps on {len(jax.devices())} device(s), mesh {dict(mesh.shape)}')

  clock = {'t': time.perf_counter(), 'step': start}
  last: dict = {}

  def report(step: int, metrics) -> None:
    m = jax.device_get(metrics)
    for key in ('loss', 'grad_norm'):
      if not math.isfinite(float(m[key])):
        raise UserError(f'{key} became {float(m[key])} at step {step}; stopping '
                        f'(last good checkpoint: step {ckpt.latest_step()})')
    if step == start + 1:
      progress.write(f'first step (with compilation) took {time.perf_counter() - clock["t"]:.1f}s')
      clock.update(t=time.perf_counter(), step=step)
      return
    if step % cfg.train.log_every and step != end:
      return
    now = time.perf_counter()
    dt = (now - clock['t']) / max(step - clock['step'], 1)
    clock.update(t=now, step=step)
    record = {'step': step, 'split': 'train', 'loss': float(m['loss']),
              'learning_rate': float(m['learning_rate']), 'grad_norm': float(m['grad_norm']),
              'tokens_per_sec': tokens_per_step / dt, 'step_time': dt}
    writer.write(record)
    progress.update(step, record)
    last.update(record)

  pending = None
  for step in range(start, end):
    batch = pipeline.to_global(next(stream), batch_sharding)
    state, metrics = train_step(state, batch)
    if pending is not None:
      report(*pending)
    pending = (step + 1, metrics)
    done = step + 1
    if done % cfg.train.checkpoint_every == 0 or done == end:
      ckpt.save(done, state, stream.get_state(), config_json)
    if cfg.eval.every and (done % cfg.eval.every == 0 or done == total):
      report(*pending)
      pending = None
      scores = evaluate.score(eval_step, state.params, _periodic_eval_batches(cfg, tok, heldout),
                              batch_sharding)
      record = {'step': done, 'split': 'eval', 'loss': scores['loss']}
      writer.write(record)
      progress.write(f'step {done:>6}  held-out loss {scores["loss"]:.4f}')
      clock.update(t=time.perf_counter(), step=done)
  if pending is not None:
    report(*pending)
  progress.close()
  ckpt.close()
  stream.close()
  if stream.skips.summary():
    print(f'llm-jax: data: {stream.skips.summary()}', file=sys.stderr, flush=True)
  _say(f'{"finished" if end == total else "stopped"} at step {end}; checkpoint in {ckpt.directory}')
  return {'step': end, **last}


def _periodic_eval_batches(cfg, tok, heldout):
  """The same held-out batches every time: the first documents, this process's share of them."""
  local = pipeline.local_batch_size(cfg.data)
  return pipeline.eval_batches(heldout, tok, cfg.data, local, num_batches=cfg.eval.batches,
                               process_index=jax.process_index(), process_count=jax.process_count())
