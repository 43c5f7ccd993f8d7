"""Checkpoints: the whole truth of a run in one orbax step directory, written so that no fault loses more than
the steps since the last one.

Items: `params` and `train` (optimizer state, step, rng) as sharded arrays, `data` (the input iterator's
state) and `config` (the resolved config) as JSON. Orbax writes JSON from process 0 only, so the data state
it is given already holds every process's shards (data/pipeline.py: TrainStream.get_state gathers them).
`eval` and `generate` restore `params` alone. Nothing is pickled: arrays go through tensorstore, everything
else is JSON.

A checkpoint may hold `params` and `config` alone (`save_params`): weights imported from Hugging Face.
Training starts from those params with a fresh optimizer and data stream (`has_train_state`).

Faults (see checkpoint_files.py for what orbax does on disk):
- a save interrupted by a kill leaves `N.orbax-checkpoint-tmp`: never read; training removes it with a
  warning, readers ignore it with one;
- a damaged step (a file truncated or missing, a restore that fails) is passed over for the newest step that
  reads, with a warning naming the step and the file; training moves it aside to `N.damaged`;
- a save that fails (disk full, read-only filesystem) is one line naming the step and the reason; the
  previous checkpoint is untouched (orbax deletes old steps only after a new one is committed).

The workdir may be a URL: orbax writes gs:// and s3:// itself (etils.epath and tensorstore); llm-jax's own
files beside its steps go through storage.py. A bucket has no free-space figure, so the space checks are
skipped there.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from llm_jax import distributed, storage
from llm_jax.run import checkpoint_files as files
from llm_jax.run import lora
from llm_jax.errors import UserError
from llm_jax.train.state import TrainState
from llm_jax.run.workdir import unwritable

# Failures of a save that are the machine's state, not a bug: reported as one line, without a traceback.
_IO_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


class _QuietIOFailures(logging.Filter):
  """Orbax logs a failed background save with its traceback three or four times before the failure reaches
  `save` or `wait`; an I/O failure is then reported as one line (`_raise_write_failure`), so its records
  are dropped. Every other orbax error is still logged."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or 'orbax' not in record.pathname:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    return _io_reason(exc) is None and not any(os.strerror(code) in text for code in _IO_ERRORS)


_QUIET = _QuietIOFailures()


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), 'checkpoints')


class Checkpointer:
  """`create=True`: the writer (training), which cleans up after interrupted saves and moves damaged steps
  aside. `create=False`: a reader that changes nothing on disk."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, create: bool = True,
               adapters_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self._writer = create
    # LoRA runs (lora.py): `params` holds the adapters alone; the frozen base lives in init_from.
    self.adapters_only = adapters_only
    self._async = async_save
    self._pending: int | None = None  # the step whose save may still be running in the background
    logging.getLogger('absl').addFilter(_QUIET)  # a no-op when already there
    if create:
      self._prepare_directory()
    elif files.incomplete_saves(self.directory):
      files.warn(f'ignoring incomplete checkpoint saves in {self.directory}: '
                 f'{", ".join(files.incomplete_saves(self.directory))} (interrupted before they were committed)')
    # Always the asynchronous checkpointer: its post-finalization callback is where the manifest is written
    # into the step before orbax commits it; `async_save=False` just waits for each save.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal) if create else None)
    self._mgr = ocp.CheckpointManager(files.orbax_directory(self.directory), options=options)

  def _prepare_directory(self) -> None:
    if jax.process_index() == 0:
      try:
        storage.makedirs(self.directory)
      except OSError as e:
        raise UserError(f'cannot write checkpoints to {self.directory}: {e.strerror or e}') from None
      # A bucket has no permission bits to ask: a refused write is reported when it happens.
      why = None if storage.is_url(self.directory) else unwritable(storage.local_path(self.directory))
      if why:
        raise UserError(f'cannot write checkpoints to {self.directory}: {why}')
      leftovers = files.incomplete_saves(self.directory)
      if leftovers:
        files.warn(f'removing incomplete checkpoint saves in {self.directory}: {", ".join(leftovers)} '
                   '(interrupted before they were committed; never read)')
        files.remove_incomplete(self.directory, leftovers)
    _sync('llm_jax_checkpoint_dir')

  def _seal(self) -> None:
    files.write_manifest(self.directory, self._pending)

  def latest_step(self) -> int | None:
    """The newest committed step; `restore_latest` is what checks that it reads."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def check_space(self, abstract_state: Any) -> None:
    """A clear error before training when not even one checkpoint fits on the workdir's filesystem."""
    need = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))
    free = storage.free_bytes(self.directory)
    if free is not None and free < need:
      raise UserError(f'{self.directory} has {_mb(free)} free; one checkpoint of this run needs about '
                      f'{_mb(need)} (parameters and optimizer state): free some space or use another --workdir')

  def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
    """Blocks only while arrays are copied off the device; the write finishes in the background."""
    params = lora.split(state.params)[1] if self.adapters_only else state.params
    self._save(step, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
    ), _tree_bytes((params, state.opt_state)))

  def save_params(self, step: int, params: Any, config: dict) -> None:
    """A step of params alone (imported weights), sealed by its manifest like any other."""
    self._save(step, ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config)),
               _tree_bytes(params))

  def has_train_state(self, step: int) -> bool:
    return storage.isdir(storage.join(self.directory, str(step), 'train'))

  def _save(self, step: int, args: ocp.args.Composite, nbytes: int) -> None:
    self.wait()  # a failure of the previous save surfaces here, named after its own step
    self._pending = step
    self._check_room(step, nbytes)
    try:
      self._mgr.save(step, args=args, force=True)  # force: never skipped silently
    except Exception as e:
      self._raise_write_failure(e)
      raise
    if not self._async:
      self.wait()

  def _check_room(self, step: int, nbytes: int) -> None:
    """A save that cannot fit is refused before orbax starts it. Orbax would fail part-way instead, and the
    tensorstore writes still in flight when it gives up then print tracebacks ('Event loop is closed') from
    their threads: the one-line error would arrive buried under them."""
    free = storage.free_bytes(self.directory)
    if free is None or free >= nbytes:
      return
    good = self._mgr.latest_step()
    kept = (f'the newest complete checkpoint, step {good}, is intact' if good is not None
            else 'no complete checkpoint was written before it')
    raise UserError(f'cannot write the checkpoint of step {step} to {self.directory}: '
                    f'{os.strerror(errno.ENOSPC)} ({_mb(free)} free, it needs about {_mb(nbytes)}); {kept}')

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      self._raise_write_failure(e)
      raise

  def _raise_write_failure(self, e: BaseException) -> None:
    why = _io_reason(e)
    if why is None:
      return  # not the machine's state: a bug, which keeps its traceback
    if jax.process_index() == 0:
      files.remove_incomplete(self.directory, files.incomplete_saves(self.directory))
    self._mgr.reload()
    good = self._mgr.latest_step()
    kept = (f'the newest complete checkpoint, step {good}, is intact' if good is not None
            else 'no complete checkpoint was written before it')
    raise UserError(f'cannot write the checkpoint of step {self._pending} to {self.directory}: {why}; '
                    f'{kept}') from None

  def restore(self, step: int, abstract_state: TrainState, base_params: Any = None) -> tuple[TrainState, dict]:
    """The state of `step`; with adapters_only, its adapters joined to `base_params` (the frozen base)."""
    abstract_params = abstract_state.params
    if self.adapters_only:
      abstract_params = lora.split(abstract_params)[1]
    abstract_train = {'step': abstract_state.step, 'opt_state': abstract_state.opt_state,
                      'rng': abstract_state.rng}
    out = self._mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train=ocp.args.StandardRestore(abstract_train),
        data=ocp.args.JsonRestore(),
    ))
    train = out['train']
    params = out['params']
    if self.adapters_only:
      params = lora.merge(lora.split(base_params)[0], params)
    state = TrainState(step=train['step'], params=params, opt_state=train['opt_state'],
                       rng=train['rng'])
    return state, out['data']

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    out = self._mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    return out['params']

  def restore_latest(self, abstract_state: TrainState, base_params: Any = None
                     ) -> tuple[int, TrainState | Any, dict | None] | None:
    """(step, state, data state) of the newest step that reads; None when there are no steps at all. A step
    of params alone (imported weights) gives (step, params, None). `base_params`: see `restore`."""
    def restore(step: int):
      if self.has_train_state(step):
        return self.restore(step, abstract_state, base_params)
      return self.restore_params(step, abstract_state.params), None
    found = self._newest_readable(restore)
    return None if found is None else (found[0], *found[1])

  def restore_latest_params(self, abstract_params: Any) -> tuple[int, Any] | None:
    return self._newest_readable(lambda step: self.restore_params(step, abstract_params))

  def _newest_readable(self, restore: Callable[[int], Any]):
    damaged: list[tuple[int, str]] = []
    for step in sorted(self._mgr.all_steps(), reverse=True):
      _, problem = files.check_step(self.directory, step)
      result = None
      if problem is None:
        try:
          result = restore(step)
        except UserError:
          raise
        except Exception as e:  # whatever tensorstore or the JSON reader makes of a damaged file
          problem = files.describe_error(e)
      problem = _agree(problem)
      if problem is None:
        self._report_damaged(damaged, step)
        return step, result
      damaged.append((step, problem))
    if damaged:
      raise UserError(f'no checkpoint in {self.directory} can be read (' +
                      '; '.join(f'step {s}: {why}' for s, why in damaged) +
                      '); move them away to start over')
    return None

  def _report_damaged(self, damaged: list[tuple[int, str]], good: int) -> None:
    for step, why in damaged:
      where = ''
      if self._writer and jax.process_index() == 0:
        where = f'; moved aside to {files.move_aside(self.directory, step)}'
      files.warn(f'checkpoint step {step} in {self.directory} cannot be read ({why}): using step {good} '
                 f'instead{where}')
    if damaged and self._writer:
      _sync('llm_jax_checkpoint_damaged')
      self._mgr.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mgr.close()


def _io_reason(e: BaseException) -> str | None:
  """The strerror of an I/O failure anywhere in the exception's chain (tensorstore reports them inside a
  ValueError's text), or None."""
  seen = []
  while e is not None and e not in seen and len(seen) < 8:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for err in seen:
    if isinstance(err, OSError) and err.errno in _IO_ERRORS:
      return err.strerror or os.strerror(err.errno)
  for err in seen:
    text = str(err)
    for code in _IO_ERRORS:
      if os.strerror(code) in text:
        return os.strerror(code)
  return None


def _agree(problem: str | None) -> str | None:
  """Every process takes the same step: if any could not read it, none uses it."""
  if jax.process_count() == 1:
    return problem
  return problem or ('another process could not read it' if distributed.any_process(problem is not None) else None)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _tree_bytes(tree: Any) -> int:
  """The bytes of a tree's arrays (global shapes: the whole checkpoint, whichever process writes it)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'dtype'))


def _mb(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB'


def open_for_reading(workdir: str) -> Checkpointer:
  """The checkpointer of an existing run, or a one-line error saying what is missing."""
  if not storage.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist')
  if not storage.isdir(checkpoint_dir(workdir)):
    raise UserError(f'workdir {workdir} has no checkpoints (run `llm-jax train --workdir={workdir}` first)')
  ckpt = Checkpointer(workdir, create=False)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise UserError(f'workdir {workdir} has no complete checkpoint')
  return ckpt
