"""What the library's losses read, checked before they compute: a model output of another
shape often broadcasts into a number instead of failing (step scores ``[B, S, 1]`` against
step labels ``[B, S]`` give a ``[B, S, S]`` error; logits ``[B, T, V]`` with ``T == V`` go
through ``F.cross_entropy`` as ``T`` classes), so each loss names the shape it needs.

Shape reads only: no host synchronization, a few hundred nanoseconds per call.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.functional import model_scores

__all__ = ["expect_column", "expect_output", "shape_of"]


def shape_of(value: Any) -> str:
    """``(4, 32)`` for a tensor, the type's name for anything else (for messages)."""
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def expect_output(loss: str, output: Any, dims: int, reads: str, hint: str = "") -> Tensor:
    """The scores ``loss`` reads (:func:`model_scores`); a ValueError naming ``loss`` unless
    they are a tensor with ``dims`` dimensions. ``reads`` says what the loss reads (e.g.
    ``class logits [B, C]``)."""
    output = model_scores(output)
    if isinstance(output, Tensor) and output.dim() == dims:
        return output
    raise ValueError(
        f"{loss} reads {reads} from the model, got output {shape_of(output)}"
        + (f" ({hint})" if hint else "")
    )


def expect_column(loss: str, name: str, column: Any, shape: tuple[int, ...], reads: str) -> None:
    """Raise a ValueError naming ``loss`` and the column unless ``column`` is shaped ``shape``."""
    if isinstance(column, Tensor) and tuple(column.shape) == tuple(shape):
        return
    raise ValueError(
        f"{loss} reads column {name!r} as {reads}, shaped {tuple(shape)} for this output, got "
        f"{shape_of(column)}"
    )
