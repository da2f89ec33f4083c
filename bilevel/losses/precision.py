"""Loss arithmetic in at least float32: half-precision outputs (autocast) are upcast, float32
and float64 outputs are kept as they are, so a float64 model gets float64 losses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["upcast"]


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
