"""Column batches: ``dict[str, Tensor | dict[str, Tensor]]`` whose tensors share dim 0.

Nested dicts carry multi-tensor model inputs (``x = {"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Columns",
    "chunks",
    "concat",
    "domain_columns",
    "leaves",
    "num_rows",
    "take",
    "tensors",
    "to_device",
]

Columns = dict[str, Any]


def leaves(columns: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of every column that is not a dict, nested dicts included and named
    by their path (``x.input_ids``)."""
    for key, value in columns.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def tensors(columns: Mapping[str, Any]) -> Iterator[Tensor]:
    """Every tensor in ``columns``, nested dicts included."""
    return (value for _, value in leaves(columns) if isinstance(value, Tensor))


def num_rows(columns: Mapping[str, Any]) -> int:
    """Length of dim 0 shared by every tensor (``ValueError`` if they disagree)."""
    sizes = {t.shape[0] for t in tensors(columns)}
    if len(sizes) > 1:
        lengths = ", ".join(
            f"{name} {value.shape[0]}"
            for name, value in leaves(columns)
            if isinstance(value, Tensor)
        )
        raise ValueError(f"columns have different lengths ({lengths}): one row per example")
    return sizes.pop() if sizes else 0


def take(columns: Mapping[str, Any], index: Tensor) -> Columns:
    """Rows ``index`` of every tensor column (non-tensor values are passed through)."""
    out: Columns = {}
    for key, value in columns.items():
        if isinstance(value, Mapping):
            out[key] = take(value, index)
        elif isinstance(value, Tensor):
            out[key] = value.index_select(0, index)
        else:
            out[key] = value
    return out


def concat(parts: Sequence[Mapping[str, Any]]) -> Columns:
    """Rows of ``parts`` (column dicts with the same keys, nested dicts included) one after
    another."""
    out: Columns = {}
    for key, value in parts[0].items():
        if isinstance(value, Mapping):
            out[key] = concat([p[key] for p in parts])
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def domain_columns(parts: Sequence[Mapping[str, Any]]) -> Columns:
    """The training columns of K domains: ``parts[k]`` holds domain k's rows; the result is
    their concatenation plus the ``domain`` column (int64 ``[N]``, k for the rows of part k)."""
    out = concat(parts)
    out["domain"] = torch.cat(
        [torch.full((num_rows(p),), k, dtype=torch.int64) for k, p in enumerate(parts)]
    )
    return out


def to_device(columns: Mapping[str, Any], device: torch.device | str) -> Columns:
    out: Columns = {}
    for key, value in columns.items():
        if isinstance(value, Mapping):
            out[key] = to_device(value, device)
        elif isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def chunks(columns: Mapping[str, Any], size: int) -> Iterator[Columns]:
    """Consecutive row slices of at most ``size`` rows (for evaluation)."""
    n = num_rows(columns)
    for start in range(0, n, size):
        index = torch.arange(start, min(start + size, n), device=next(tensors(columns)).device)
        yield take(columns, index)
