"""A sweep goes on past a job that ends with a one-line error.

A single run that meets bad input (exit 2) or non-finite values (exit 3) stops the process. In
a sweep (``-m``, or an Optuna search) that would cost every job after it, so a failed job
instead leaves its line and code in its folder (:data:`bilevel.logging.run_dir.FAILED`, read by the
sweep's ``results.csv``), returns a :class:`FailedJob` in place of its meta loss, and the sweep
runs on; once it is over, :func:`exit_if_failed` exits with the worst code.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bilevel.errors import first_line
from bilevel.files import write_text_atomic
from bilevel.logging import run_dir as run_dirs

__all__ = ["FailedJob", "codes", "exit_if_failed", "in_sweep", "record", "run_app"]

#: exit codes of the jobs of this process's sweep that ended with a one-line error
codes: list[int] = []


class FailedJob:
    """What a failed sweep job returns instead of its meta loss: it has no float value, so an
    Optuna sweep marks the trial failed and goes on (a NaN value makes the Optuna plugin
    raise)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __float__(self) -> float:
        raise ValueError(self.message)

    def __str__(self) -> str:
        return self.message


def in_sweep() -> bool:
    """Whether the Hydra job that runs now is one job of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def record(message: str, code: int) -> FailedJob:
    """Print ``message``, note ``code`` and leave both in the job's folder (if that folder is
    a run directory of ours or holds only Hydra's files)."""
    from hydra.core.hydra_config import HydraConfig

    print(message, file=sys.stderr, flush=True)
    codes.append(code)
    out = Path(HydraConfig.get().runtime.output_dir)
    if out.is_dir() and (run_dirs.is_run_dir(out) or run_dirs.hydra_only(out)):
        note = json.dumps({"exit_code": code, "error": message}) + "\n"
        write_text_atomic(out / run_dirs.FAILED, note)
    return FailedJob(message)


def run_app(app: Callable[[], object], args: list[str]) -> None:
    """Run the Hydra ``app``. An Optuna sweeper whose trials all failed cannot name a best
    trial and ends in a traceback of its own: that case becomes one line (each trial already
    said why it failed), and so does an error of Hydra's in setting up the sweep (an interval
    for the basic sweeper: a traceback, exit 1); any other error is reported as Hydra reports
    it."""
    sweep = any(
        a in ("-m", "--multirun") or a.startswith(("hparams_search=", "hydra/sweeper="))
        for a in args
    )
    if not sweep or "HYDRA_FULL_ERROR" in os.environ:
        app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # the error reaches the handler below
    try:
        app()
    except Exception as err:  # noqa: BLE001 - handed back to Hydra's report below
        del os.environ["HYDRA_FULL_ERROR"]
        if codes and "No trials are completed" in str(err):
            _exit_worst(f"every trial of the sweep failed ({len(codes)}; each said why above")
        from hydra.errors import HydraException

        if isinstance(err, HydraException):  # the sweep's own setup, e.g. its search space
            line = first_line(str(err)) or type(err).__name__
            if "does not support sweep type" in line:
                line += " (the basic sweeper takes lists a,b and range(); intervals need an "
                line += "Optuna search: hparams_search=optuna)"
            print(f"bilevel: error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)
        from hydra._internal.utils import run_and_report

        error = err

        def again() -> None:
            raise error

        run_and_report(again)  # prints as Hydra would have, exits 1
    else:
        del os.environ["HYDRA_FULL_ERROR"]


def exit_if_failed() -> None:
    """After a sweep: one line and the worst exit code if any job failed."""
    if codes:
        count = len(codes)
        _exit_worst(f"{count} sweep job{'s' if count > 1 else ''} failed (each said why above")


def _exit_worst(what: str) -> None:
    """``bilevel: <what>; results.csv ...)`` on stderr, then exit with the worst code."""
    print(
        f"bilevel: {what}; results.csv has each line in its error column)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(max(codes))
