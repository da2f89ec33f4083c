"""Test-set metrics for the shipped tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import modes
from bilevel.data.columns import Columns, chunks
from bilevel.functional import forward_batch

__all__ = ["classification_metrics"]


@torch.no_grad()
def classification_metrics(
    model: nn.Module, columns: Columns, device: torch.device, chunk: int = 4096
) -> dict[str, float]:
    """``{"accuracy", "loss"}`` of a classifier on ``columns`` (``x``, ``y``)."""
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    with modes.evaluation(model):
        for batch in chunks(columns, chunk):
            logits = forward_batch(model, batch).float()
            correct += (logits.argmax(-1) == batch["y"]).sum()
            loss += F.cross_entropy(logits, batch["y"], reduction="sum").double()
            n += len(batch["y"])
    return {"accuracy": correct.item() / n, "loss": loss.item() / n}
