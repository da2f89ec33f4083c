"""First-order hypergradient: the inverse Hessian replaced by ``inner_lr * I``.

dM/dw_k = -inner_lr * <grad L_k(theta), grad M(theta)>: the exact gradient of one SGD lookahead
step theta - inner_lr * grad F when both gradients are taken at the same point (DARTS' first-order
approximation; Liu et al., 2019). Cost: one outer gradient and one forward-mode J_L v product.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.products import InnerProducts, Reduce, domain_jvp, grad_outer, leaves

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder:
    """v = inner_lr * grad M(theta); dM/dw = -J_L v."""

    name: str = "first_order"

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
    ) -> Tensor:
        names, theta = leaves(params)
        g_outer = grad_outer(outer_loss, names, theta, reduce)
        return domain_jvp(per_domain_loss, names, theta, g_outer, w.numel(), reduce) * (-inner_lr)

    def solve(self, products: InnerProducts, g_outer: list[Tensor], inner_lr: float) -> Tensor:
        """dM/dw from an existing gradient graph (the J_L v product as a second backward)."""
        return products.domain_jvp(g_outer) * (-inner_lr)
