"""The training loop: resume or init, step, log one step late, evaluate, checkpoint, stop cleanly.

The host never waits on the device in the hot loop: step s+1 is dispatched before step s's metrics are
fetched, so the fetch overlaps with device work (nanodo's pattern). The only other waits are the ones a
checkpoint needs anyway: before saving step s, step s's own metrics are checked, so a checkpoint never holds
a state that went non-finite.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp

from llm_jax import sharding, storage
from llm_jax.evaluate import heldout as heldout_eval
from llm_jax.run import finetune, workdir as workdir_lib
from llm_jax.models import flops
from llm_jax.run.checkpoint import Checkpointer
from llm_jax.data import pipeline, sources
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import dpo
from llm_jax.train.preemption import StopRequests
from llm_jax.train.progress import Progress
from llm_jax.train.sinks import TENSORBOARD_DIR, Sinks
from llm_jax.train.step import make_eval_step, setup_train_step


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _Profile:
  """A JAX profiler trace of train.profile_steps (first, last), for TensorBoard's profile tab or Perfetto."""

  def __init__(self, steps, logdir: str, say):
    self.first, self.last = (tuple(steps) * 2)[:2] if steps else (None, None)
    self.logdir, self._say, self._active = logdir, say, False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
      self._active = True

  def after(self, step: int, state) -> None:
    if self._active and step >= self.last:
      self.stop(state)

  def stop(self, state) -> None:
    if self._active:
      jax.block_until_ready(state)  # the trace must contain the device work of the last profiled step
      jax.profiler.stop_trace()
      self._active = False
      self._say(f'profiled steps {self.first}-{self.last}: trace in {self.logdir}/plugins/profile/')


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Train `cfg` in `workdir` until cfg.train.steps, resuming from its latest checkpoint if any.

  `stop_at` ends this invocation early (with a checkpoint) without changing the run itself: the schedule
  still runs to cfg.train.steps, so a later invocation continues the same run. So does SIGTERM / SIGINT;
  the result then names the signal ('stopped_by').
  """
  cfg = finetune.resolve(cfg)  # init_from: its architecture checked, vocabulary and tokenizer taken
  workdir_lib.check_writable(workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, cfg.data.seq_len, mesh, rules, cfg.train.microbatches)
  tok = workdir_lib.tokenizer_for_training(workdir, cfg)

  # Built before the state exists: jit only traces at the first call, once the state is restored or made.
  setup = setup_train_step(cfg, mesh, rules)
  train_step, factory, batch_sharding = setup.step, setup.factory, setup.batch_sharding
  eval_model = build_model(cfg.model)
  stream = pipeline.TrainStream(cfg.data, tok, seed=cfg.seed, model_cfg=cfg.model)

  ckpt, latest, imported, init_state = None, None, False, None
  lora_run = cfg.model.lora.rank > 0
  try:
    # Opened before anything is written: a bad data.heldout_source is one line, the workdir untouched.
    heldout = sources.open_source(cfg.data, 'heldout') if cfg.eval.every else None
    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, adapters_only=lora_run)
    abstract_state = factory.abstract_sharded()
    ckpt.check_space(abstract_state)
    if cfg.init_from and (ckpt.latest_step() is None or lora_run):
      # A LoRA run never saves its frozen base: it is read from init_from at every start and resume.
      init_state = finetune.initial_state(cfg, factory, mesh, rules)
    # The newest step that reads; damaged ones are passed over.
    found = ckpt.restore_latest(abstract_state, init_state.params if lora_run else None)
    if found is not None:
      latest, state, data_state = found
      imported = data_state is None  # params alone: weights from `convert from-hf`
      if imported:
        state = factory.init_from_params(state, cfg.seed)
      else:
        stream.set_state(data_state)
    elif init_state is not None:
      state = init_state
    workdir_lib.prepare(workdir, cfg, tok)  # every input read: now the run's config and tokenizer are saved
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    stream.close()
    raise
  if imported:
    _say(f'starting from the params of step {latest} of {workdir} (no optimizer state: imported weights)')
  elif latest is not None:
    _say(f'resumed from step {latest} of {workdir}')
  elif init_state is not None:
    _say(f'starting from the params of {cfg.init_from} (step 0, new optimizer state)')
  else:
    state = factory.init(cfg.seed)
  start, total = (latest or 0), cfg.train.steps
  end = total if stop_at is None else min(stop_at, total)
  if start >= end:
    _say(f'{workdir} is already at step {start} of {total}; nothing to do')
    ckpt.close()
    stream.close()
    return {'step': start}

  if setup.reference:
    # The reference is the run's step-0 params (init_from's, plus untrained adapters), rebuilt at every
    # start so a resumed run compares against the same model. A copy: the state's own buffers are donated.
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=factory.param_shardings)(
        (init_state if init_state is not None else finetune.initial_state(cfg, factory, mesh, rules)).params)
    train_step = lambda state, batch: setup.step(state, batch, ref_params)  # noqa: E731
  eval_step = make_eval_step(eval_model, mesh, rules, factory.param_shardings, batch_sharding,
                             loss_chunk=cfg.train.loss_chunk)
  config_json = cfg.to_dict()
  sinks = Sinks(workdir, cfg.train, config_json)
  progress = Progress(start, total)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len, cfg.data.target_len)
  peak = flops.device_peak_flops()
  profile = _Profile(cfg.train.profile_steps, storage.join(workdir, TENSORBOARD_DIR), progress.write)
  _say(f'training {end - start} steps on {len(jax.devices())} device(s), mesh {dict(mesh.shape)}, '
       f'{flops_per_token / 1e6:,.1f} MFLOPs/token'
       + ('' if peak else f' (MFU not reported: no known peak for {jax.devices()[0].device_kind})'))

  clock = {'t': time.perf_counter(), 'step': start}
  last: dict = {}
  multi_process = jax.process_count() > 1

  def report(step: int, metrics) -> None:
    m = jax.device_get(metrics)
    if not bool(m['finite']):
      bad = ' and '.join(k for k in ('loss', 'grad_norm') if not math.isfinite(float(m[k])))
      if 'skipped' not in m:
        ckpt.wait()
        good = ckpt.latest_step()
        where = f'the last good checkpoint is step {good} in {ckpt.directory}' if good is not None else \
            'no checkpoint was written'
        raise UserError(f'{bad or "a gradient"} became non-finite at step {step}; stopping ({where}; '
                        'lower train.learning_rate or set train.skip_nonfinite=true to skip such steps)')
      progress.write(f'step {step:>6}  {bad or "a gradient"} non-finite: update skipped '
                     f'({int(m["skipped"])} skipped so far)')
    if step == start + 1:
      progress.write(f'first step (with compilation) took {time.perf_counter() - clock["t"]:.1f}s')
      clock.update(t=time.perf_counter(), step=step)
      return
    if step % cfg.train.log_every and step != end:
      return
    now = time.perf_counter()
    dt = (now - clock['t']) / max(step - clock['step'], 1)
    clock.update(t=now, step=step)
    tokens_per_sec = tokens_per_step / dt
    record = {'step': step, 'split': 'train', 'loss': float(m['loss']), 'z_loss': float(m['z_loss']),
              'learning_rate': float(m['learning_rate']), 'grad_norm': float(m['grad_norm']),
              'param_norm': float(m['param_norm']), 'tokens_per_sec': tokens_per_sec, 'step_time': dt,
              'mfu': flops.mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)}
    if 'skipped' in m:
      record['skipped'] = int(m['skipped'])
    record.update({k: float(m[k]) for k in dpo.DPO_METRICS if k in m})
    sinks.write(record)
    progress.update(step, record)
    last.update(record)

  pending = None
  stopped_by = None
  with StopRequests() as stop:
    try:
      for step in range(start, end):
        profile.before(step + 1)
        batch = pipeline.to_global(next(stream), batch_sharding)
        state, metrics = train_step(state, batch)
        if pending is not None:
          report(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        profile.after(done, state)
        # Multi-process runs agree on stopping with a collective, so only at log steps; alone, every step.
        check_stop = not multi_process or done % cfg.train.log_every == 0
        if check_stop and stop.requested():
          stopped_by = stop.signal_name or 'another process'
        if done % cfg.train.checkpoint_every == 0 or done == end or stopped_by:
          report(*pending)
          pending = None
          ckpt.save(done, state, stream.get_state(), config_json)
        if stopped_by:
          break
        if cfg.eval.every and (done % cfg.eval.every == 0 or done == total):
          if pending is not None:
            report(*pending)
            pending = None
          scores = heldout_eval.score(eval_step, state.params, _periodic_eval_batches(cfg, tok, heldout),
                                       batch_sharding)
          record = {'step': done, 'split': 'eval', 'loss': scores['loss']}
          sinks.write(record)
          progress.write(f'step {done:>6}  held-out loss {scores["loss"]:.4f}')
          clock.update(t=time.perf_counter(), step=done)
      if pending is not None:
        report(*pending)
    finally:
      profile.stop(state)
      progress.close()
      sinks.close()
      ckpt.close()  # waits for the last asynchronous save: what was written is complete
      stream.close()
  if stream.skips.summary():
    print(f'llm-jax: data: {stream.skips.summary()}', file=sys.stderr, flush=True)
  if stopped_by:
    _say(f'stopped by {stopped_by} at step {done}: checkpoint saved in {ckpt.directory}; '
         f'run `llm-jax train --workdir={workdir}` to resume')
    return {'step': done, 'stopped_by': stopped_by, 'signum': stop.signum, **last}
  _say(f'{"finished" if end == total else "stopped"} at step {end}; checkpoint in {ckpt.directory}')
  return {'step': end, **last}


def _periodic_eval_batches(cfg, tok, heldout):
  """The same held-out batches every time: the first documents, this process's share of them."""
  local = pipeline.local_batch_size(cfg.data)
  return pipeline.eval_batches(heldout, tok, cfg.data, local, num_batches=cfg.eval.batches,
                               model_cfg=cfg.model, seed=cfg.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
