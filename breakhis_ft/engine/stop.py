"""SIGTERM handled like Ctrl-C: the recipe stops at the next batch and checkpoints.

SLURM, Cloud Run, Vertex and `docker stop` send SIGTERM, then SIGKILL after a grace period (Cloud
Run: 10 seconds). For the whole run (`sigterm_interrupts`), SIGTERM raises `RunInterrupted` as
Ctrl-C raises KeyboardInterrupt; while the recipe trains (`StopSignal`) the handler only records
the request and the recipe checks it before each micro-batch and each evaluation batch: it drops
an unfinished gradient accumulation, saves the last completed update's checkpoint and raises
`StopRequested`, so the run ends as `interrupted` with nothing lost, within about one micro-batch,
and the process exits with 128 + the signal's number.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run; `step` is its latest checkpoint's (where `resume=`
    continues), saved at the stop when one process trains; None outside training."""

    def __init__(self, step: int | None, signal_name: str) -> None:
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"{signal_name}{where}")
        self.step, self.signal_name = step, signal_name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (143, 130)."""
        return 128 + int(signal.Signals[self.signal_name])


class StopRequested(KeyboardInterrupt):
    """A stop signal acted on between two batches, at the same batch on every process
    (`signal_name`: this process's signal, or SIGTERM where another process received it)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _in_main_thread() -> bool:
    # signal handlers can only be installed from the main thread (not in a worker thread)
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise RunInterrupted(None, signal.Signals(signum).name)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises RunInterrupted wherever the run is (as Ctrl-C does)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignal:
    """A context that turns SIGTERM into a stop request (`requested` names the signal)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: Any = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
