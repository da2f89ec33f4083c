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


def loss_factors(
    losses: Tensor, mode: str, strength: float, clip: float, reduce=None, world_size: int = 1
) -> Tensor:
    """Per-example factors ``[B]`` (mean 1) from the detached losses ``[B]``.

    ``reduce`` (averages tensors over the ``world_size`` data-parallel ranks): the mean and
    standard deviation of the losses, and the factors' mean, are those of the global batch, as
    one process training on all of it computes them (each rank's own batch gave other
    z-scores)."""
    losses = losses.detach().float()
    if reduce is None:
        if losses.numel() < 2:
            return torch.ones_like(losses)
        mean, std = losses.mean(), losses.std()
    else:
        sums = torch.stack(  # in double: E[l^2] - E[l]^2 without cancellation
            [losses.double().sum(), (losses.double() ** 2).sum(), losses.new_tensor(len(losses))]
        )
        (sums,) = reduce([sums.double()])
        count = sums[2] * world_size  # the global batch's size (sums[2] is the ranks' mean)
        mean = sums[0] / sums[2]
        variance = (sums[1] / sums[2] - mean * mean) * count / (count - 1).clamp_min(1)
        mean, std = mean.float(), variance.clamp_min(0).sqrt().float()
    z = ((losses - mean) / std.clamp_min(1e-12)).clamp(-clip, clip)
    sign = 1.0 if mode == "up" else -1.0
    factors = 1 + sign * strength * z
    if reduce is None:
        return factors / factors.mean()
    (total,) = reduce([torch.stack([factors.sum(), factors.new_tensor(len(factors))])])
    return factors / (total[0] / total[1])


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

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        world = loop.strategy.world_size
        reduce = loop.strategy.reduce if world > 1 else None

        def factors(per_example: Tensor, batch: dict) -> Tensor:
            found = loss_factors(per_example, self.mode, self.strength, self.clip, reduce, world)
            return found.to(per_example.dtype)

        for _ in range(n):
            loop.inner_step(loop.next_batch(), example_weights=factors)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
