"""Stop a run cleanly on Ctrl-C or SIGTERM: finish the window, checkpoint, then stop.

A cluster scheduler that preempts a job sends SIGTERM and, after a grace period, SIGKILL; a
user stops a run with Ctrl-C. Either way the run should lose nothing: :func:`stop_requests`
turns the first SIGINT / SIGTERM into a request that the trainer reads between windows (a
Python flag, no host synchronization); the trainer then saves a checkpoint at that window's
end and raises :class:`StopRequested`, so ``bilevel-run resume=<run dir>`` continues exactly. A
second signal acts at once, as it would without this module.

Only a single process on the main thread installs handlers: under torchrun the ranks would have
to agree on the window to stop at (a collective per window), and the periodic checkpoints keep
what they keep; signals that the process ignores (a background job's SIGINT) stay ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StopRequest", "StopRequested", "stop_requests"]

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@dataclass
class StopRequest:
    """The name of the first stopping signal received (``None``: none yet)."""

    signal: str | None = None


class StopRequested(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint at ``step``.

    A ``KeyboardInterrupt`` so that code catching ``Exception`` does not swallow it.
    """

    def __init__(self, signal_name: str, step: int, run_dir: Path | None) -> None:
        self.signal_name, self.step, self.run_dir = signal_name, step, run_dir
        where = (
            f"checkpoint saved; continue with: bilevel-run resume={run_dir}"
            if run_dir is not None
            else "no run directory, so nothing was saved"
        )
        super().__init__(f"stopped by {signal_name} at step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 130)


@contextmanager
def stop_requests(enabled: bool = True) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT / SIGTERM sets the request instead of stopping."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handle(signum: int, frame) -> None:  # noqa: ARG001
        request.signal = signal.Signals(signum).name
        restore()  # a second signal acts at once

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is signal.SIG_IGN or handler is None:
            continue
        previous[sig] = handler
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        restore()
