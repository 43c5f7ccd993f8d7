"""Checkpoints: the whole truth of a run in one orbax step directory.

Items: `params` and `train` (optimizer state, step, rng) as sharded arrays, `data` (the input iterator's
state) and `config` (the resolved config) as JSON. Orbax writes JSON from process 0 only, so the data state
it is given already holds every process's shards (data/pipeline.py: TrainStream.get_state gathers them). `eval` and `generate` restore `params` alone.
Nothing is pickled: arrays go through tensorstore, everything else is JSON.

A checkpoint may hold `params` and `config` alone (`save_params`): weights imported from Hugging Face.
Training starts from those params with a fresh optimizer and data stream (`has_train_state`).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from llm_jax import lora
from llm_jax.errors import UserError
from llm_jax.train.state import TrainState


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, create: bool = True,
               adapters_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    # LoRA runs (lora.py): `params` holds the adapters alone; the frozen base lives in init_from.
    self.adapters_only = adapters_only
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
    """Blocks only while arrays are copied off the device; the write finishes in the background."""
    params = lora.split(state.params)[1] if self.adapters_only else state.params
    self._mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
    ))

  def save_params(self, step: int, params: Any, config: dict) -> None:
    self._mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 config=ocp.args.JsonSave(config)))

  def has_train_state(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), 'train'))

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

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def open_for_reading(workdir: str) -> tuple[Checkpointer, int]:
  """The checkpointer of an existing run and its latest step, or a one-line error saying what is missing."""
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist')
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise UserError(f'workdir {workdir} has no checkpoints (run `llm-jax train --workdir={workdir}` first)')
  ckpt = Checkpointer(workdir, create=False)
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f'workdir {workdir} has no complete checkpoint')
  return ckpt, step
