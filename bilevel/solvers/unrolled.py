"""Unrolled hypergradient: reverse-mode differentiation through ``steps`` inner SGD steps.

theta_0 = params, theta_{t+1} = theta_t - inner_lr * grad_theta F(theta_t, w); returns the exact
dM(theta_T)/dw (Maclaurin et al., 2015; Franceschi et al., 2017). Memory grows with ``steps``
(every step's graph is kept); the w-gradient of each step is the J_L v product of that step's
graph, so the cost stays flat in K.

``backend="torch"`` differentiates plain autograd graphs; ``backend="higher"`` builds the same
steps with ``higher``'s differentiable SGD (the reference implementation, for cross-checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.errors import is_integer
from bilevel.functional import (
    OuterLoss,
    Params,
    PerDomainLoss,
    check_per_domain_shape,
)
from bilevel.solvers.products import (
    Reduce,
    check_outer_value,
    grads_or_zeros,
    leaves,
    per_tensor,
    poison_nonfinite,
)

__all__ = ["Unrolled", "sgd_step"]

BACKENDS = ("torch", "higher")


@dataclass(frozen=True)
class Unrolled:
    """Exact dM(theta_T)/dw through ``steps`` plain SGD steps (lr = inner_lr) from ``params``."""

    steps: int = 5
    backend: str = "torch"
    name: str = "unrolled"

    def __post_init__(self) -> None:
        if not is_integer(self.steps) or self.steps < 1:
            raise ValueError(f"unrolled: steps must be an integer >= 1, got {self.steps!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unrolled: unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}"
            )

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
    ) -> Tensor:
        if reduce is not None:
            raise NotImplementedError(
                "unrolled does not average across data-parallel ranks; under torchrun use "
                "first_order, neumann or cg"
            )
        names, theta = leaves(params)
        w_leaf = w.detach().requires_grad_(True)
        k = w.numel()

        seen: list[Tensor] = []

        def inner(current: list[Tensor]) -> Tensor:
            losses = check_per_domain_shape(
                per_domain_loss(dict(zip(names, current))), k, differentiable=True
            )
            seen.append(losses.detach())
            return torch.dot(w_leaf.to(losses.dtype), losses)

        if self.backend == "higher":
            current = _unroll_higher(inner, theta, inner_lr, self.steps)
        else:
            current = theta
            for _ in range(self.steps):
                current = sgd_step(inner(current), current, inner_lr)
        value = check_outer_value(outer_loss(dict(zip(names, current, strict=True))))
        (grad_w,) = grads_or_zeros(value, [w_leaf])
        return poison_nonfinite(grad_w, value.detach(), *seen)


def sgd_step(objective: Tensor, theta: list[Tensor], lr) -> list[Tensor]:
    """theta - lr * grad objective, differentiable: the gradient keeps its graph
    (``create_graph``), so the result stays differentiable in theta and in whatever the
    objective was built from (the weights). ``lr``: one number, or one per tensor (an SGD
    optimizer whose parameter groups have learning rates of their own)."""
    grads = torch.autograd.grad(
        objective, theta, create_graph=True, allow_unused=True, materialize_grads=True
    )
    if per_tensor(lr):
        return [t - s * g for t, s, g in zip(theta, lr, grads, strict=True)]
    return list(torch._foreach_add(theta, grads, alpha=-lr))


def _unroll_higher(inner, theta: list[Tensor], inner_lr: float, steps: int) -> list[Tensor]:
    try:
        import higher
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "unrolled backend='higher' needs the 'higher' package: pip install higher"
        ) from err
    if per_tensor(inner_lr):  # one group per tensor, each with its own step size
        groups = [{"params": [t], "lr": s} for t, s in zip(theta, inner_lr, strict=True)]
        reference = torch.optim.SGD(groups)
    else:
        reference = torch.optim.SGD(theta, lr=inner_lr)
    diffopt = higher.optim.DifferentiableSGD(reference, theta, track_higher_grads=True)
    current = list(theta)
    for _ in range(steps):
        current = list(diffopt.step(inner(current), params=current))
    return current
