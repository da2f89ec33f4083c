"""Outer-loop updates of the weight logits besides the torch optimizers.

:class:`MirrorDescent` is the exponentiated-gradient (entropic mirror descent) step that DoReMi
uses on the simplex: w <- normalize(w * exp(-lr * dM/dw)), then optionally mixed with the uniform
vector, w <- (1 - smoothing) w + smoothing / K. With the softmax parametrization this is the
additive step logits <- logits - lr * dM/dw, so it is written as an ordinary
``torch.optim.Optimizer`` over the logits whose ``.grad`` holds dM/dw (the gradient with respect
to the weight VALUES, not the logits); :class:`~bilevel.BilevelTrainer` fills it that way.
With the exp parametrization (and no smoothing) the same step is unnormalized EG on w > 0.

:class:`LazyAdam` is Adam that moves only the entries with a nonzero gradient, for a table of
one weight per training example (``weights=instance_table``): an outer step's hypergradient
reaches only the examples of its batch, and plain Adam would go on moving every other row with
its momentum.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bilevel.errors import is_finite_number

__all__ = ["LazyAdam", "MirrorDescent"]


def _closure_loss(closure) -> Tensor | None:  # noqa: ANN001 - torch.optim's closure
    """``closure()`` under grad mode, as ``torch.optim`` steps evaluate it (``None``: none)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
        loss = _closure_loss(closure)
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


class LazyAdam(torch.optim.Optimizer):
    """Adam whose moments and parameters change only where the gradient is nonzero.

    For a parameter that is a table of rows of which a step touches a few (one logit per
    training example): the rows a batch did not hold keep their values and their moments, as
    if the step had not happened for them; each row counts its own steps for the bias
    correction. Everything stays on the device (masks, no indexing by a host-side count).

    Args:
        params: the tensors (e.g. the instance table's logits ``[N]``).
        lr, betas, eps: as :class:`torch.optim.Adam`.

    Skips on the device where ``found_inf`` (a 0-d tensor set by the caller) is nonzero.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not (is_finite_number(lr) and lr > 0):
            raise ValueError(f"LazyAdam: lr must be a finite number > 0, got {lr}")
        if not all(is_finite_number(b) and 0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"LazyAdam: betas must be two numbers in [0, 1), got {betas}")
        if not (is_finite_number(eps) and eps > 0):
            raise ValueError(f"LazyAdam: eps must be a finite number > 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["steps"] = torch.zeros_like(p)  # per entry: its own bias correction
                touched = g != 0
                if self.found_inf is not None:
                    touched = touched & ~self.found_inf.to(torch.bool)
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["steps"]
                t.copy_(torch.where(touched, t + 1, t))
                m.copy_(torch.where(touched, beta1 * m + (1 - beta1) * g, m))
                v.copy_(torch.where(touched, beta2 * v + (1 - beta2) * g * g, v))
                count = t.clamp_min(1)
                m_hat = m / (1 - beta1**count)
                v_hat = v / (1 - beta2**count)
                update = group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
                p.copy_(torch.where(touched, p - update, p))
        return loss
