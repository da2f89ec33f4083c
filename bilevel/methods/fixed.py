"""The fixed-weight baseline (``trainer.learn_weights=false``): plain inner steps, no outer update.

A method that moves the weights by its own rule (ODM's bandit, ScaleBiO's penalty, DoGE) also
changes what its inner steps do or keeps state for its update; with the weights held fixed none
of that applies, so the trainer runs this method in its place.
"""

from __future__ import annotations

from typing import Any

from bilevel.methods.base import OuterUpdate

__all__ = ["FixedWeights"]


class FixedWeights:
    """``n`` plain inner steps on the weighted inner loss per window; never an outer update.

    Args:
        replaced: the name of the method it stands in for (recorded in ``summary.json``).
    """

    uses_meta = False
    uses_hessian = False

    def __init__(self, replaced: str) -> None:
        self.name = replaced

    def setup(self, loop) -> list[str]:
        return []

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        for _ in range(n):
            loop.inner_step(loop.next_batch())
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
