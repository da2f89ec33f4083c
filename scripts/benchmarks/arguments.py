"""Argument types shared by the scripts: a count of repeats, threads or sizes that is zero or
negative is refused by argparse with its usage line, instead of a traceback from deep inside
(e.g. ``statistics.median`` of no timings)."""

from __future__ import annotations

import argparse

__all__ = ["nonnegative_int", "positive_int"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value
