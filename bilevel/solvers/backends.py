"""The product backends a solver can run on, and how the public API builds them.

``products="autograd"`` (the default) differentiates twice and is exact;
``products="finite_difference"`` needs only forward and backward passes
(:mod:`bilevel.solvers.finite_difference`). Both expose the same three methods, ``hvp(u)``,
``domain_jvp(v)`` and ``dot(a, b)``, which are all a solver's ``solve`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from bilevel.errors import is_finite_number
from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.finite_difference import FiniteDifferenceProducts, FunctionalPoint
from bilevel.solvers.products import (
    InnerProducts,
    Reduce,
    TensorList,
    domain_jvp,
    grad_outer,
    leaves,
)

__all__ = [
    "PRODUCTS",
    "HessianFrom",
    "WithL2",
    "SolvesAtParams",
    "check_products",
    "jvp_at",
    "products_at",
]

PRODUCTS = ("autograd", "finite_difference")


def check_products(solver_name: str, products: str, step: float | None) -> None:
    """``ValueError`` for an unknown backend or a bad finite-difference step."""
    if products not in PRODUCTS:
        raise ValueError(
            f"{solver_name}: unknown products {products!r}; valid: {', '.join(PRODUCTS)}"
        )
    if step is not None and not (is_finite_number(step) and 0 < step < 1):
        raise ValueError(f"{solver_name}: fd_step must lie in (0, 1) or be null, got {step!r}")
    if step is not None and products != "finite_difference":
        # the step of a product that is not taken: it would change nothing, silently
        raise ValueError(
            f"{solver_name}: fd_step={step} applies to products=finite_difference only (got "
            f"products={products!r})"
        )


class HessianFrom:
    """Products whose H u come from ``hessian`` (another minibatch at the same theta) and whose
    J_L v and dot products come from ``jvp``: an estimate whose two factors do not share the
    same sampling noise."""

    def __init__(self, jvp, hessian) -> None:
        self.jvp, self.hessian = jvp, hessian

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return self.jvp.dot(a, b)

    def hvp(self, u: Sequence[Tensor]) -> TensorList:
        return self.hessian.hvp(u)

    def domain_jvp(self, v: Sequence[Tensor]) -> Tensor:
        return self.jvp.domain_jvp(v)

    def hvp_jvp(self, u: Sequence[Tensor]) -> tuple[TensorList, Tensor]:
        return self.hessian.hvp(u), self.jvp.domain_jvp(u)


class WithL2:
    """Products of the inner objective F + sum_i lambda_i/2 |theta_i|^2, where the L2 term is
    the inner optimizer's coupled weight decay (:func:`bilevel.optim.l2_decay`): H u gains
    lambda_i u_i; J_L v is unchanged (the term does not depend on the weights)."""

    def __init__(self, products, decay: Sequence[float]) -> None:
        self.products, self.decay = products, list(decay)

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return self.products.dot(a, b)

    def _add(self, hu: TensorList, u: Sequence[Tensor]) -> TensorList:
        for h, x, lam in zip(hu, u, self.decay, strict=True):
            if lam:
                h.add_(x, alpha=lam)  # the product's own output (neumann's damping does the same)
        return hu

    def hvp(self, u: Sequence[Tensor]) -> TensorList:
        return self._add(self.products.hvp(u), u)

    def domain_jvp(self, v: Sequence[Tensor]) -> Tensor:
        return self.products.domain_jvp(v)

    def hvp_jvp(self, u: Sequence[Tensor]) -> tuple[TensorList, Tensor]:
        hu, jl = self.products.hvp_jvp(u)
        return self._add(hu, u), jl


def products_at(
    kind: str,
    per_domain_loss: PerDomainLoss,
    names: list[str],
    theta: TensorList,
    w: Tensor,
    reduce: Reduce | None = None,
    step: float | None = None,
    hessian_loss: PerDomainLoss | None = None,
):
    """Products of F = sum_k w_k L_k at ``theta`` with the backend ``kind``; with
    ``hessian_loss``, H u come from that (independent) batch's losses instead."""
    if kind == "finite_difference":
        point = FunctionalPoint(per_domain_loss, names, theta, w)
        h_point = FunctionalPoint(hessian_loss, names, theta, w) if hessian_loss else None
        return FiniteDifferenceProducts(
            point, step, reduce=reduce, grad_reduce=reduce, hessian_point=h_point
        )
    products = InnerProducts.at(per_domain_loss, names, theta, w, reduce)
    if hessian_loss is not None:
        return HessianFrom(products, InnerProducts.at(hessian_loss, names, theta, w, reduce))
    return products


def jvp_at(
    kind: str,
    per_domain_loss: PerDomainLoss,
    names: list[str],
    theta: TensorList,
    v: TensorList,
    w: Tensor,
    reduce: Reduce | None = None,
    step: float | None = None,
) -> Tensor:
    """J_L v alone (what first-order methods need): one forward-mode pass (autograd) or two
    forward passes (finite differences)."""
    if kind == "finite_difference":
        point = FunctionalPoint(per_domain_loss, names, theta, w)
        return FiniteDifferenceProducts(point, step, reduce=reduce).domain_jvp(v)
    return domain_jvp(per_domain_loss, names, theta, v, w.numel(), reduce)


class SolvesAtParams:
    """``domain_grad`` for a solver whose math is its ``solve(products, g_outer, inner_lr)``
    step (cg, neumann): ``solve`` on fresh products at ``params``, as
    :func:`bilevel.hypergradient` asks. The trainer instead hands ``solve`` its last inner
    step's graph, or products at the module's own parameters. The subclass has ``products``
    and ``fd_step`` fields."""

    products: str
    fd_step: float | None

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
        hessian_loss: PerDomainLoss | None = None,
        l2: Sequence[float] | None = None,
    ) -> Tensor:
        """``l2``: one L2 coefficient per tensor of ``params`` (the inner optimizer's coupled
        weight decay), added to the Hessian; ``None``: none."""
        names, theta = leaves(params)
        g_outer = grad_outer(outer_loss, names, theta, reduce)
        products = products_at(
            self.products, per_domain_loss, names, theta, w, reduce, self.fd_step, hessian_loss
        )
        if l2 is not None:
            products = WithL2(products, l2)
        return self.solve(products, g_outer, inner_lr)
