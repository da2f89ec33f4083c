"""The kept solution of a warm-started implicit solver (amortized implicit differentiation).

Between two outer steps the inner parameters and the weights move a little, so the previous
solution v of H v = grad M is a good start for the next solve (Arbel & Mairal, 2022,
"Amortized implicit differentiation for stochastic bilevel optimization"): one or two
iterations per outer step then do the work of many cold ones. :class:`WarmState` holds that v
on the device (shaped like the parameters, local shards under FSDP); the trainer checkpoints it,
so a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["WarmState"]


class WarmState:
    """The last solution of a linear solve, or nothing (a cold start)."""

    def __init__(self) -> None:
        self.v: list[Tensor] | None = None

    def start(self, like: Sequence[Tensor]) -> list[Tensor] | None:
        """The kept solution if it fits ``like`` (same shapes, dtypes, devices), else ``None``."""
        if self.v is None or len(self.v) != len(like):
            return None
        for a, b in zip(self.v, like):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return None
        return self.v

    def keep(self, v: Sequence[Tensor]) -> None:
        """Keep ``v`` (in place, no copy) for the next call; a ``v`` with any non-finite entry
        is kept as zeros, so the next call starts afresh. A solve on a non-finite batch (its
        hypergradient is skipped by the trainer) left NaN in v, and every later warm call
        returned NaN: one bad batch stopped the run. On the device, no host read."""
        v = [t.detach() for t in v]
        if v:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(v)).sum())
            for t in v:
                t.nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_mul_(v, finite.to(v[0].dtype))
        self.v = v

    def reset(self) -> None:
        self.v = None

    def state_dict(self) -> dict[str, Any]:
        return {"v": None if self.v is None else [t.clone() for t in self.v]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("v")
        self.v = None if v is None else [torch.as_tensor(t) for t in v]

    def to(self, device: torch.device) -> None:
        if self.v is not None:
            self.v = [t.to(device) for t in self.v]
