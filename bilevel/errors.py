"""The one exception type for bad user input, reported as one line with exit code 2."""

from __future__ import annotations

import math
import numbers

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "WriteError",
    "first_line",
    "is_bool",
    "is_finite_number",
    "is_integer",
]


class ConfigError(ValueError):
    """Bad input found before training starts.

    Args:
        field: the config key at fault, e.g. ``"data.label_noise"``.
        message: what is wrong and what is expected.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NonFiniteError(RuntimeError):
    """Raised after ``trainer.max_skipped`` consecutive non-finite updates (after a checkpoint)."""


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a quota, a read-only or foreign
    folder): the machine's fault, not the input's, and reported as one line (exit 1). The file
    keeps its previous version (:func:`bilevel.files.write_atomic`).

    Args:
        path: the file that could not be written.
        err: the operating system's error.
    """

    def __init__(self, path: object, err: OSError) -> None:
        self.path = path
        reason = err.strerror or first_line(str(err)) or type(err).__name__
        super().__init__(err.errno, f"cannot write {path}: {reason}")

    def __str__(self) -> str:
        return str(self.args[1])


def is_finite_number(value: object) -> bool:
    """True for a real number (not a bool) that is neither inf nor nan: a hyperparameter
    check written ``is_finite_number(x) and x > 0`` refuses ``inf`` as well as ``nan`` and
    strings, where ``x > 0`` alone lets ``inf`` through to a run of non-finite updates."""
    return (
        isinstance(value, numbers.Real)  # numpy scalars too
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def is_integer(value: object) -> bool:
    """True for an integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_bool(value: object) -> bool:
    """True for ``True``/``False`` (numpy's too): a switch given as a string (``maybe``, a
    misspelt ``ture``) is truthy in Python and would silently turn the option on."""
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def first_line(text: str) -> str:
    """The first line of an error's text ('' for an empty message): what a one-line report
    shows of a third party's multi-line message."""
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
