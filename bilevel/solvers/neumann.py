"""Implicit hypergradient with a truncated Neumann series for the inverse Hessian.

H^-1 ~ alpha * sum_{j=0}^{iters} (I - alpha H)^j, which converges when 0 < alpha < 2/lambda_max(H)
for a positive definite H (Lorraine et al., 2020, "Optimizing Millions of Hyperparameters by
Implicit Differentiation"). ``iters`` is the number of Hessian-vector products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.products import InnerProducts, Reduce, solve_at_params

__all__ = ["Neumann"]


@dataclass(frozen=True)
class Neumann:
    """v = alpha * sum_{j=0}^{iters} (I - alpha H)^j grad M; dM/dw = -J_L v.

    ``params`` should be (close to) the inner solution theta*(w).
    """

    iters: int = 20
    alpha: float = 0.1
    name: str = "neumann"

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"neumann: iters must be an integer >= 0, got {self.iters!r}")
        if not self.alpha > 0:
            raise ValueError(f"neumann: alpha must be > 0, got {self.alpha!r}")

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
    ) -> Tensor:
        return solve_at_params(self, per_domain_loss, outer_loss, params, w, inner_lr, reduce)

    def solve(self, products: InnerProducts, g_outer: list[Tensor], inner_lr: float) -> Tensor:
        """dM/dw given the inner products and grad M (``inner_lr`` is not used)."""
        term = [g.detach() for g in g_outer]
        total = [t.clone() for t in term]
        for _ in range(self.iters):
            h = products.hvp(term)
            term = torch._foreach_add(term, h, alpha=-self.alpha)
            torch._foreach_add_(total, term)
        torch._foreach_mul_(total, self.alpha)
        return -products.domain_jvp(total)
