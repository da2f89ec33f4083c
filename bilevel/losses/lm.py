"""Language-model losses on next-token logits ``[B, T, V]`` and targets ``batch["y"]`` ``[B, T]``.

Positions whose target is ``ignore_index`` (-100) do not count (padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from bilevel.losses.precision import upcast

__all__ = ["per_sequence_token_cross_entropy", "token_cross_entropy"]


def _token_losses(output: Tensor, targets: Tensor) -> Tensor:
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
    mask = (targets != -100).float()
    return (_token_losses(output, targets) * mask).sum(1) / mask.sum(1).clamp_min(1)


def token_cross_entropy(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Outer loss: mean next-token cross-entropy over every target token -> scalar."""
    targets = batch["y"]
    mask = (targets != -100).float()
    return (_token_losses(output, targets) * mask).sum() / mask.sum().clamp_min(1)
