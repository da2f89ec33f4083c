"""Loss-based per-example reweighting: a bounded function of each example's current loss.

In the spirit of Sow et al., ICLR 2025, "Dynamic Loss-Based Sample Reweighting for Improved
Large Language Model Pretraining": no meta set and no hypergradient; within every batch each
example's loss is standardized, z_i = (l_i - mean) / std, clipped to [-clip, clip], and turned
into a factor

    c_i = 1 + strength * z_i        (mode="up": emphasize the examples the model finds hard)
    c_i = 1 - strength * z_i        (mode="down": emphasize the easy ones, discount outliers
                                     such as mislabeled examples)

renormalized to mean 1 over the batch, so the step size is unchanged; ``strength * clip < 1``
keeps every factor positive. The factors multiply the per-example losses before the usual
per-domain reduction; the domain weights stay as they are (uniform unless set). Cost: nothing
beyond training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import is_finite_number
from bilevel.methods.base import OuterUpdate

__all__ = ["LossReweighting", "loss_factors"]

MODES = ("up", "down")


def loss_factors(losses: Tensor, mode: str, strength: float, clip: float) -> Tensor:
    """Per-example factors ``[B]`` (mean 1) from the detached losses ``[B]``."""
    losses = losses.detach().float()
    if losses.numel() < 2:
        return torch.ones_like(losses)
    z = (losses - losses.mean()) / losses.std().clamp_min(1e-12)
    z = z.clamp(-clip, clip)
    sign = 1.0 if mode == "up" else -1.0
    factors = 1 + sign * strength * z
    return factors / factors.mean()


@dataclass(frozen=True)
class LossReweighting:
    """Per-example factors from the current loss (see the module doc).

    Args:
        mode: ``"up"`` or ``"down"``.
        strength: slope of the factor in standardized loss.
        clip: |z| is clipped here (``strength * clip`` must be < 1).
    """

    mode: str = "down"
    strength: float = 0.3
    clip: float = 2.0
    name: str = "loss_reweighting"

    uses_meta = False
    moves_weights = False  # its factors are per example; the domain weights stay fixed
    uses_outer_optimizer = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"loss_reweighting: mode must be up or down, got {self.mode!r}")
        numbers = is_finite_number(self.strength) and is_finite_number(self.clip)
        if not (numbers and self.strength >= 0 and self.clip > 0 and self.strength * self.clip < 1):
            raise ValueError(
                "loss_reweighting: need strength >= 0, clip > 0 and strength * clip < 1 (every "
                f"factor positive), got strength={self.strength!r}, clip={self.clip!r}"
            )

    def setup(self, loop) -> list[str]:
        return []

    def _factors(self, per_example: Tensor, batch: dict) -> Tensor:
        return loss_factors(per_example, self.mode, self.strength, self.clip).to(per_example.dtype)

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        for _ in range(n):
            loop.inner_step(loop.next_batch(), example_weights=self._factors)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
