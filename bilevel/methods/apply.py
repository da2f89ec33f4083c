"""Applying a method's :class:`~bilevel.methods.OuterUpdate` to the weights, on the device (for
the library's trainer and for the integrations with other trainers alike).

A gradient goes through the parametrization (unless the outer optimizer steps on the values
themselves, as mirror descent does) and then the outer optimizer; new values are assigned
directly. Either is skipped on the device where it is not finite, without a host read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.hypergradient import chain_through_parametrization
from bilevel.methods.base import OuterUpdate
from bilevel.methods.hypergradient import wants_values
from bilevel.optim import guarded_step

__all__ = ["apply_update"]


def apply_update(
    weights: torch.nn.Module, outer_opt: torch.optim.Optimizer, update: OuterUpdate
) -> tuple[Tensor, Tensor | None]:
    """Apply ``update``; returns the 0-d skip flag (nonzero: skipped) and, for a gradient
    step, a 0-d flag that it moved the weights (a nonzero gradient, not skipped; ``None``
    where new values were assigned)."""
    logits = weights.logits
    if update.values is not None:
        values = update.values.detach()
        found = update.found
        if found is None:
            found = (~torch.isfinite(values).all()).float()
        weights.assign_values_(values, skip=found)
        return found, None
    grad = update.grad.detach()
    if not update.wrt_logits and not wants_values(outer_opt):
        grad = chain_through_parametrization(weights, grad)
    grad = grad.to(logits.dtype)
    found = update.found
    if found is None:
        found = (~torch.isfinite(grad).all()).float()
    # finite but so large that its square overflows (|g| > ~1e19 in float32, e.g. a diverging
    # Neumann series): Adam's second moment became inf and every later step of the weights was
    # exactly 0, silently; a step that size is no update anyway
    found = torch.maximum(found, (~torch.isfinite(grad.square().sum())).to(found.dtype))
    logits.grad = grad
    guarded_step(outer_opt, found)
    return found, (grad != 0).any() & (found == 0)
