"""SIGTERM (preemption, `kill`, a scheduler's time limit) and SIGINT (Ctrl-C) ask the loop to stop after the
current step with a checkpoint, instead of killing it mid-step with everything since the last checkpoint.

A second SIGINT aborts at once (the default behaviour), for when even one more step is too long to wait.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax

from llm_jax import distributed


class StopRequests:
  """Context manager: while active, SIGTERM / SIGINT set `signal_name` instead of ending the process."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self) -> StopRequests:
    # Python only lets the main thread install handlers; elsewhere (a library caller's worker thread) the
    # process keeps its default behaviour.
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop waiting
    if self.signal_name is None:
      self.signum, self.signal_name = signum, signal.Signals(signum).name
      if jax.process_index() == 0:
        print(f'llm-jax: received {self.signal_name}: finishing this step and saving a checkpoint '
              '(Ctrl-C again aborts without one)', file=sys.stderr, flush=True)

  def requested(self) -> bool:
    """Whether any process was asked to stop. Every process must stop at the same step (a checkpoint is a
    collective), so in a multi-process run this is a small all-gather: call it at the same steps on all."""
    return distributed.any_process(self.signal_name is not None)
