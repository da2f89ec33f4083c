"""Bad user input: the exception types, and the checks every entry point makes the same way.

A mistake in the input is a :class:`ConfigError`, reported as one line naming the field with
exit code 2. The small checks here (numbers, switches, the seed, the device) are shared by the
command line, :class:`~bilevel.BilevelTrainer` and the data builders, so each setting is refused
in the same words wherever it is given: not an assertion from inside torch (``Torch not
compiled with CUDA enabled``) or a ``TypeError`` from the first batch drawn."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import torch

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "WriteError",
    "check_device",
    "check_seed",
    "first_line",
    "is_bool",
    "is_finite_number",
    "is_integer",
    "resolve_device",
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


SEED_LIMIT = 2**32


def check_seed(value: Any, field: str = "seed") -> int:
    """``value`` as an int in ``[0, 2**32)`` (a string of digits from the command line is one);
    else one line naming ``field``. The range is the one every generator the runs seed accepts
    (numpy's refuses a negative seed, torch's one beyond 64 bits) with room for the per-rank
    streams derived from it; a float was truncated without a word."""
    number = None
    if is_integer(value):
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        number = int(value)
    if number is None or not 0 <= number < SEED_LIMIT:
        raise ConfigError(field, f"must be an integer in [0, 2**32), got {value!r}")
    return number


def check_device(value: Any) -> str:
    """``device`` as torch understands it (``auto`` allowed); one line for anything else."""
    text = str(value)
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            "device", f"unknown device {text!r}; use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{text!r} requested but CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                "device", f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "'mps' requested but it is not available here")
    if device.type == "meta":
        raise ConfigError(
            "device", "'meta' tensors hold shapes but no data, so nothing can train on them"
        )
    if device.type not in ("cpu", "cuda", "mps"):  # xpu, hpu, ...: where torch has them
        try:
            available = bool(torch.get_device_module(device.type).is_available())
        except (AttributeError, RuntimeError, ValueError):
            available = False
        if not available:
            raise ConfigError("device", f"{text!r} requested but it is not available here")
    return text


def resolve_device(value: str | torch.device) -> torch.device:
    """The checked device; ``auto`` is the GPU where there is one, else the CPU."""
    text = check_device(value)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)
