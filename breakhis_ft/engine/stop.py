"""SIGTERM handled like Ctrl-C: the recipe stops at the next update boundary and checkpoints.

SLURM, Cloud Run, Vertex and `docker stop` send SIGTERM, then SIGKILL after a grace period. The
handler only records the request; the training loop checks it after each optimizer update, saves
a checkpoint there and raises, so the run ends as `interrupted` with nothing lost.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignal:
    """A context that turns SIGTERM into a stop request (`requested` names the signal)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: Any = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        # signal handlers can only be installed from the main thread (not in a worker thread)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
