"""Implicit hypergradient with conjugate gradients for (H + damping I) v = grad M.

Exact for a positive definite H after at most dim(theta) iterations in exact arithmetic
(Rajeswaran et al., 2019, iMAML; Pedregosa, 2016). The loop never reads a value back to the host:
once the residual drops below ``tol * ||grad M||`` (or reaches zero), the step sizes are masked
to 0 on the device, so the iterate stays put instead of the loop breaking early. The same happens
at a direction of non-positive curvature (truncated CG, as in Steihaug's method): a non-convex
inner loss can make H indefinite, where plain CG steps would diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.products import InnerProducts, Reduce, solve_at_params, tree_dot

__all__ = ["ConjugateGradient"]


@dataclass(frozen=True)
class ConjugateGradient:
    """v = (H + damping I)^-1 grad M by ``iters`` CG iterations from v0 = 0; dM/dw = -J_L v.

    ``params`` should be (close to) the inner solution theta*(w).
    """

    iters: int = 10
    damping: float = 0.0
    tol: float = 0.0
    name: str = "cg"

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"cg: iters must be an integer >= 1, got {self.iters!r}")
        if not self.damping >= 0:
            raise ValueError(f"cg: damping must be >= 0, got {self.damping!r}")
        if not self.tol >= 0:
            raise ValueError(f"cg: tol must be >= 0, got {self.tol!r}")

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
        g_outer = [g.detach() for g in g_outer]

        def apply(u: list[Tensor]) -> list[Tensor]:
            hu = products.hvp(u)
            return torch._foreach_add(hu, u, alpha=self.damping) if self.damping else hu

        x = [torch.zeros_like(g) for g in g_outer]
        r = [g.clone() for g in g_outer]
        p = [g.clone() for g in g_outer]
        rr = tree_dot(r, r)
        threshold = (self.tol**2) * rr
        done = torch.zeros((), dtype=torch.bool, device=rr.device)
        for _ in range(self.iters):
            ap = apply(p)
            pap = tree_dot(p, ap)
            # Converged, or a direction of non-positive curvature (H is not positive definite
            # there, as happens away from a minimum): keep the current iterate from now on.
            done = done | (rr <= threshold) | (pap <= 0)
            active = ~done
            step = torch.where(active, rr / torch.where(active, pap, 1), 0)
            torch._foreach_add_(x, torch._foreach_mul(p, step))
            torch._foreach_sub_(r, torch._foreach_mul(ap, step))
            rr_new = tree_dot(r, r)
            beta = torch.where(active, rr_new / torch.where(active, rr, 1), 0)
            p = torch._foreach_add(r, torch._foreach_mul(p, beta))
            rr = torch.where(active, rr_new, rr)
        return -products.domain_jvp(x)
