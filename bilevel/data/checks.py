"""Checks shared by the data builders: each bad setting is one line naming ``data.<field>``."""

from __future__ import annotations

from bilevel.errors import ConfigError, is_integer

__all__ = ["check_counts"]


def check_counts(**fields: tuple[object, int]) -> None:
    """``field=(value, minimum)``: each value must be an integer >= its minimum.

    A count below the minimum (a negative ``meta_size``, a zero ``seq_len``) used to surface
    later as a misleading message (an empty meta set) or a traceback inside the builder.
    """
    for name, (value, minimum) in fields.items():
        if not is_integer(value) or value < minimum:
            raise ConfigError(f"data.{name}", f"must be an integer >= {minimum}, got {value!r}")
