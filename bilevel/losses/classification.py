"""Classification losses: per-example (inner) and mean (outer) cross-entropy on ``batch["y"]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from bilevel.losses.precision import upcast

__all__ = ["per_example_cross_entropy", "cross_entropy"]


def per_example_cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Inner loss: cross-entropy of logits ``[B, C]`` against ``batch["y"]`` ``[B]`` -> ``[B]``."""
    return F.cross_entropy(upcast(output), batch["y"], reduction="none")


def cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Outer loss: mean cross-entropy of logits ``[B, C]`` against ``batch["y"]`` -> scalar."""
    return F.cross_entropy(upcast(output), batch["y"])
