"""Checks shared by the data builders: each bad setting is one line naming ``data.<field>``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bilevel.errors import ConfigError, is_finite_number, is_integer
from bilevel.errors import check_seed as _check_seed

__all__ = ["check_counts", "check_fractions", "check_list", "check_names", "check_seed"]


def check_counts(**fields: tuple[object, int]) -> None:
    """``field=(value, minimum)``: each value must be an integer >= its minimum.

    A count below the minimum (a negative ``meta_size``, a zero ``seq_len``) used to surface
    later as a misleading message (an empty meta set) or a traceback inside the builder.
    """
    for name, (value, minimum) in fields.items():
        if not is_integer(value) or value < minimum:
            raise ConfigError(f"data.{name}", f"must be an integer >= {minimum}, got {value!r}")


def check_fractions(**fields: tuple[object, str]) -> None:
    """``field=(value, interval)``, the interval one of ``[0, 1)``, ``(0, 1)``, ``[0, 1]``: each
    value must be a finite number in it (a string failed with "'<=' not supported between
    instances of 'int' and 'str'", naming neither the field nor the range)."""
    for name, (value, interval) in fields.items():
        inside = is_finite_number(value) and (
            (value >= 0 if interval[0] == "[" else value > 0)
            and (value <= 1 if interval[-1] == "]" else value < 1)
        )
        if not inside:
            raise ConfigError(f"data.{name}", f"must lie in {interval}, got {value!r}")


def check_list(field: str, value: object, example: str) -> list:
    """``value`` as a list, or a :class:`ConfigError` naming ``data.<field>``: a string would be
    read letter by letter (``data.names=abcd`` made four domains a, b, c, d) and a number not
    at all."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"data.{field}", f"must be a list, e.g. {example}, got {value!r}")
    return list(value)


def check_names(field: str, value: object, example: str) -> list[str]:
    """:func:`check_list` of distinct names (the same name twice would make two domains or
    classes of the same data)."""
    names = [str(n) for n in check_list(field, value, example)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"data.{field}", f"lists {', '.join(twice)} more than once; each must be distinct"
        )
    return names


def check_seed(value: object) -> int:
    """``data.seed`` as an int in ``[0, 2**32)``, like the run's own seed (``int(seed)`` cut
    ``1.5`` to 1 without a word, and numpy refused a negative one from inside a builder)."""
    return _check_seed(value, "data.seed")
