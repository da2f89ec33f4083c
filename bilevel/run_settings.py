"""The run-wide settings that every entry point checks the same way (the command line and
:class:`~bilevel.BilevelTrainer`): the seed and the device. A bad one is one line naming it,
not an assertion from inside torch (``Torch not compiled with CUDA enabled``) or a
``TypeError`` from the first batch drawn."""

from __future__ import annotations

import re
from typing import Any

import torch

from bilevel.errors import ConfigError, is_integer

__all__ = ["check_device", "check_seed", "resolve_device"]


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
