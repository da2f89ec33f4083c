"""A log record (or the summary) as flat scalars: ``weights/<domain>``, ``domain_loss/<domain>``,
``test/<metric>``, ``inner_loss``, ``meta_loss``, ... (what every tracker's scalar API takes)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["scalars"]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``record`` by their path (one level of nesting: ``group/name``), without
    ``step``; strings, lists and non-finite values are left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, item in items:
            if isinstance(item, bool) or not isinstance(item, int | float):
                continue
            if not math.isfinite(float(item)):
                continue
            flat[key if name is None else f"{key}/{name}"] = float(item)
    return flat
