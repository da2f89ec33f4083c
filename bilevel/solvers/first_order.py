"""First-order hypergradient: the inverse Hessian replaced by ``inner_lr * I``.

dM/dw_k = -inner_lr * <grad L_k(theta), grad M(theta)>: the exact gradient of one SGD lookahead
step theta - inner_lr * grad F when both gradients are taken at the same point (DARTS' first-order
approximation; Liu et al., 2019). Cost: one outer gradient and one J_L v product (forward mode
with ``products="autograd"``, two forward passes with ``"finite_difference"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.backends import check_products, jvp_at
from bilevel.solvers.products import Reduce, grad_outer, leaves, per_tensor, scaled

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder:
    """v = inner_lr * grad M(theta); dM/dw = -J_L v.

    Args:
        products: ``"autograd"`` (exact) or ``"finite_difference"`` (forward passes only).
        fd_step: relative finite-difference step (``None``: chosen from the dtype).
    """

    products: str = "autograd"
    fd_step: float | None = None
    name: str = "first_order"

    def __post_init__(self) -> None:
        check_products(self.name, self.products, self.fd_step)

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
        hessian_loss: PerDomainLoss | None = None,
    ) -> Tensor:
        names, theta = leaves(params)
        g_outer = grad_outer(outer_loss, names, theta, reduce)
        if per_tensor(inner_lr):  # v = lr_i grad_i M: each tensor's own step size
            g_outer, inner_lr = scaled(g_outer, inner_lr), 1.0
        jl = jvp_at(self.products, per_domain_loss, names, theta, g_outer, w, reduce, self.fd_step)
        return jl * (-inner_lr)

    def solve(self, products, g_outer: list[Tensor], inner_lr) -> Tensor:
        """dM/dw from existing products (the J_L v product of the last inner step's graph).
        ``inner_lr``: one step size, or one per tensor (parameter groups' own learning
        rates)."""
        if per_tensor(inner_lr):
            return -products.domain_jvp(scaled(g_outer, inner_lr))
        return products.domain_jvp(g_outer) * (-inner_lr)
