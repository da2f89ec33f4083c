"""Language-model losses on next-token logits ``[B, T, V]`` and targets ``batch["y"]`` ``[B, T]``.

Positions whose target is ``ignore_index`` (-100) do not count (padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from bilevel.losses.precision import upcast
from bilevel.losses.shapes import expect_column, expect_output

__all__ = ["per_sequence_token_cross_entropy", "token_cross_entropy"]


def _token_losses(loss: str, output: Tensor, targets: Tensor) -> Tensor:
    output = expect_output(
        loss, output, 3, "next-token logits [B, T, V]", "class logits [B, C] go with cross_entropy"
    )
    expect_column(loss, "y", targets, output.shape[:2], "target token ids [B, T]")
    logits = upcast(output)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(targets.shape)


def per_sequence_token_cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Inner loss: mean next-token cross-entropy of each sequence -> ``[B]``."""
    targets = batch["y"]
    losses = _token_losses("per_sequence_token_cross_entropy", output, targets)
    mask = (targets != -100).float()
    return (losses * mask).sum(1) / mask.sum(1).clamp_min(1)


def token_cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Outer loss: mean next-token cross-entropy over every target token -> scalar."""
    targets = batch["y"]
    losses = _token_losses("token_cross_entropy", output, targets)
    mask = (targets != -100).float()
    return (losses * mask).sum() / mask.sum().clamp_min(1)
