"""Classification losses: per-example (inner) and mean (outer) cross-entropy on ``batch["y"]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from bilevel.losses.precision import upcast
from bilevel.losses.shapes import expect_output

_READS = "class logits [B, C]"
_HINT = (
    "next-token logits [B, T, V] go with token_cross_entropy, step scores [B, S] with the "
    "step and aggregation losses"
)

__all__ = ["per_example_cross_entropy", "cross_entropy"]


def per_example_cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Inner loss: cross-entropy of logits ``[B, C]`` against ``batch["y"]`` ``[B]`` -> ``[B]``."""
    output = expect_output("per_example_cross_entropy", output, 2, _READS, _HINT)
    return F.cross_entropy(upcast(output), batch["y"], reduction="none")


def cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Outer loss: mean cross-entropy of logits ``[B, C]`` against ``batch["y"]`` -> scalar."""
    output = expect_output("cross_entropy", output, 2, _READS, _HINT)
    return F.cross_entropy(upcast(output), batch["y"])
