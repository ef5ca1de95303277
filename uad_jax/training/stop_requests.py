"""SIGTERM and SIGINT as requests to stop at the next step boundary.

Preemption on clouds and TPU pods sends SIGTERM and gives the job a short grace period; Ctrl-C
sends SIGINT. Either one, the first time, only sets a flag: the loop finishes the step it is
running, writes a checkpoint of exactly this position and exits, so the rerun resumes from it.
A second SIGINT raises KeyboardInterrupt at once (a person who presses Ctrl-C twice means it).
During an evaluation, which follows its epoch's checkpoint and is run again on resume when its
report is missing, a signal stops the job at once instead.
In a multi-process run the flag is combined over the processes at every step, so all of them
stop at the same step even when only one host received the signal.
"""
import contextlib
import signal
import threading

import jax
import numpy as np

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopRequested(Exception):
  """The run stopped at a step boundary after a signal, its position checkpointed."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_status(self) -> int:
    return 128 + self.signum      # the shell's convention for a job ended by this signal


class StopRequests:
  """Installed as a context manager around the loop; `pending()` tells whether to stop."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._at_once = False

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    if self._at_once:
      raise StopRequested(f"stopped by {NAMES[signum]} during an evaluation; it runs again "
                          "on resume", signum)

  @contextlib.contextmanager
  def at_once(self):
    """A signal in this body stops the job immediately (nothing in it needs saving)."""
    self._at_once = True
    try:
      if self.signum is not None:
        raise StopRequested(f"stopped by {NAMES[self.signum]} before an evaluation; it runs on "
                            "resume", self.signum)
      yield
    finally:
      self._at_once = False

  def __enter__(self):
    # Signal handlers can only be set from the main thread; elsewhere (a test's worker thread)
    # the loop simply runs without them.
    if threading.current_thread() is threading.main_thread():
      for signum in NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def pending(self) -> int | None:
    """The signal to stop for, agreed by every process; None to go on."""
    signum = self.signum or 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
    return signum or None
