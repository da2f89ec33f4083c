"""Outer-loop updates of the weight logits besides the torch optimizers.

:class:`MirrorDescent` is the exponentiated-gradient (entropic mirror descent) step that DoReMi
uses on the simplex: w <- normalize(w * exp(-lr * dM/dw)), then optionally mixed with the uniform
vector, w <- (1 - smoothing) w + smoothing / K. With the softmax parametrization this is the
additive step logits <- logits - lr * dM/dw, so it is written as an ordinary
``torch.optim.Optimizer`` over the logits whose ``.grad`` holds dM/dw (the gradient with respect
to the weight VALUES, not the logits); :class:`~bilevel.BilevelTrainer` fills it that way.
With the exp parametrization (and no smoothing) the same step is unnormalized EG on w > 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bilevel.errors import is_finite_number

__all__ = ["MirrorDescent"]


class MirrorDescent(torch.optim.Optimizer):
    """Exponentiated-gradient step on domain weights (DoReMi, Xie et al., 2023).

    Args:
        params: the weight logits (one tensor ``[K]``).
        lr: step size eta.
        smoothing: mix with the uniform distribution after each step (softmax weights only).

    Skips on device: where ``found_inf`` (a 0-d tensor attribute set by the caller) is nonzero,
    the logits stay unchanged without a host synchronization.
    """

    uses_value_gradient = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1.0, smoothing: float = 0.0) -> None:
        if not (is_finite_number(lr) and lr > 0):
            raise ValueError(f"MirrorDescent: lr must be a finite number > 0, got {lr}")
        if not (is_finite_number(smoothing) and 0 <= smoothing < 1):
            raise ValueError(f"MirrorDescent: smoothing must lie in [0, 1), got {smoothing}")
        super().__init__(params, {"lr": lr, "smoothing": smoothing})
        self.found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for logits in group["params"]:
                if logits.grad is None:
                    continue
                new = logits - group["lr"] * logits.grad
                if group["smoothing"] > 0:
                    k = new.numel()
                    w = (
                        torch.softmax(new, dim=0) * (1 - group["smoothing"])
                        + group["smoothing"] / k
                    )
                    new = w.log()
                    new = new - new.mean()
                if self.found_inf is not None:
                    new = torch.where(self.found_inf.to(torch.bool), logits, new)
                logits.copy_(new)
        return loss
