"""Ctrl-C and SIGTERM during ``kappatune train``: finish the step, keep a checkpoint, stop.

Inside :func:`stop_requests`, the first SIGINT or SIGTERM only sets a flag (and puts the
default handlers back, so a second one stops at once); the training loop's step hook sees it at
the end of the step, writes the checkpoint it would write at a checkpoint step, and raises
:class:`StopRequested`. Rerunning the same command resumes from that step. Only for a run in one
process: a launched run's checkpoint is collective and its ranks would see the signal at
different steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class StopRequested(KeyboardInterrupt):
    """Raised after the checkpoint of a stopped run is written (a KeyboardInterrupt, so the
    command ends as an interrupted one, exit code 130)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step}; its checkpoint is kept")
        self.step = step


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_requests(enabled: bool = True) -> Iterator[StopFlag]:
    """A flag the first SIGINT/SIGTERM sets; the previous handlers are restored on exit."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.signal = signum
        for s, h in previous.items():  # a second signal acts at once
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
