"""The run's log file (``cli.log``) as a handler that fails quietly.

Python's logging prints a full traceback (``--- Logging error ---``) for every record its file
handler cannot write: on a full disk, every line of the run's story would become a traceback on
the terminal before the run reached its own one-line report (:class:`bilevel.errors.WriteError`).
This handler says so once, in one line, and stops writing the file; the terminal keeps the story.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["RunLogFile"]


class RunLogFile(logging.FileHandler):
    """A :class:`logging.FileHandler` that, on its first failed write, prints one line and
    ignores the records after it (the hydra ``job_logging`` config names it)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        print(
            f"bilevel: warning: cannot write {self.baseFilename} ({reason}); the run's story "
            "goes to the terminal only from here",
            file=sys.stderr,
            flush=True,
        )
