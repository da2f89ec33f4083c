"""Device-side counts of the inner steps and outer updates skipped for non-finite values."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SkipCounter"]


class SkipCounter:
    """Device-side counts of skipped inner steps and outer updates, and of the current runs of
    consecutive skips of each kind (read by the host only at log events).

    Inner and outer skips are counted separately: a run whose meta loss is NaN skips every outer
    update while its inner steps succeed, which one shared counter would keep resetting.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device, dtype=torch.float32)
        self.inner, self.outer = zero.clone(), zero.clone()
        self.consecutive_inner, self.consecutive_outer = zero.clone(), zero.clone()

    def add(self, found: Tensor, inner: bool, steps: int = 1) -> None:
        found = found.to(self.inner.dtype)
        if inner:
            self.inner += found * steps
            self.consecutive_inner = (self.consecutive_inner + found * steps) * found
        else:
            self.outer += found
            self.consecutive_outer = (self.consecutive_outer + found) * found

    def totals(self) -> dict[str, int]:
        inner, outer = int(self.inner.item()), int(self.outer.item())
        return {"skipped_steps": inner + outer, "skipped_inner": inner, "skipped_outer": outer}

    def consecutive(self) -> tuple[int, int]:
        """(consecutive inner skips, consecutive outer skips) up to now (a host read)."""
        return int(self.consecutive_inner.item()), int(self.consecutive_outer.item())

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "skipped_inner": self.inner,
            "skipped_outer": self.outer,
            "consecutive_inner": self.consecutive_inner,
            "consecutive_outer": self.consecutive_outer,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.inner.device
        self.inner = state["skipped_inner"].to(device)
        self.outer = state["skipped_outer"].to(device)
        self.consecutive_inner = state["consecutive_inner"].to(device)
        self.consecutive_outer = state["consecutive_outer"].to(device)
