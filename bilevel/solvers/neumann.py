"""Implicit hypergradient with a truncated Neumann series for the inverse Hessian.

H^-1 ~ alpha * sum_{j=0}^{iters} (I - alpha H)^j, which converges when 0 < alpha < 2/lambda_max(H)
for a positive definite H (Lorraine et al., 2020, "Optimizing Millions of Hyperparameters by
Implicit Differentiation"). The same vector is the Richardson iteration v <- v + alpha (g - H v)
run ``iters + 1`` times from v = 0 (the first step, alpha g, needs no product), which is how it is
computed here: ``iters`` Hessian-vector products.

A series that diverges (alpha above 2 / lambda_max, or strong negative curvature) is detected
on the device from its last residual (:data:`GROWTH`): its hypergradient is NaN, which the
trainer skips and reports at the end of the run (:meth:`Neumann.notes`).

``warm_start=True`` keeps v between calls and continues the Richardson iteration from it
(``iters`` products per call), so repeated calls on one problem converge to H^-1 g: amortized
implicit differentiation (Arbel & Mairal, 2022). ``damping`` solves (H + damping I) v = g
instead; warm starts accumulate the solve over outer steps, so along near-zero or negative
curvature (a non-convex inner loss) v can grow where a short cold series never reaches; the
iteration restarts from zero whenever the kept v makes the residual larger than starting from
zero would (|g - (H + damping I) v| > |g|, or not finite). A v that is not finite (a call on a
non-finite batch) is not kept: the next call starts afresh (see
:class:`~bilevel.solvers.warm.WarmState`).

``simultaneous=True`` (with ``warm_start`` and ``iters=1``) makes each call ONE product: the
gradient of <grad F, v> over the kept graph gives H v and J_L v together, the call returns
-J_L v with the kept v, then moves v one Richardson step, v <- v + alpha (g - H v). The
hypergradient lags one update of v behind the default order (which moves v first and then needs
a second product for J_L of the new v); it is the simultaneous update of SOBA (Dagreou et al.,
2022, "A framework for bilevel optimization that enables stochastic and global variance
reduction algorithms"), which converges to the same fixed point: call t returns what the
default's call t - 1 returns (a cold first call, -J_L (alpha g)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bilevel.errors import is_bool, is_finite_number, is_integer
from bilevel.solvers.backends import SolvesAtParams, check_products
from bilevel.solvers.counts import DeviceCount
from bilevel.solvers.products import poison_nonfinite
from bilevel.solvers.warm import WarmState

__all__ = ["GROWTH", "Neumann"]

#: a cold series whose last residual |g - H v| ends over this many times |g| diverges: for a
#: positive definite H and alpha < 2 / lambda_max(H) the residual only shrinks, and where the
#: inner loss has some negative curvature it grows by (1 + alpha |lambda|) per product, far
#: slower. Such a v is dominated by the diverging direction: its hypergradient is NaN, skipped
GROWTH = 100.0


@dataclass(frozen=True)
class Neumann(SolvesAtParams):
    """v = alpha * sum_{j=0}^{iters} (I - alpha H)^j grad M (cold); dM/dw = -J_L v.

    Args:
        iters: Hessian-vector products per call.
        alpha: step size of the series (< 2 / lambda_max(H)).
        damping: solve (H + damping I) v = grad M.
        warm_start: continue from the last call's v (see the module doc); :meth:`reset`.
        simultaneous: one product per call, SOBA's order (needs warm_start and iters=1).
        products: ``"autograd"`` or ``"finite_difference"``.
        fd_step: relative finite-difference step (``None``: from the dtype).

    ``params`` should be (close to) the inner solution theta*(w).
    """

    iters: int = 20
    alpha: float = 0.1
    damping: float = 0.0
    warm_start: bool = False
    simultaneous: bool = False
    products: str = "autograd"
    fd_step: float | None = None
    name: str = "neumann"
    _warm: WarmState = field(default_factory=WarmState, repr=False, compare=False)
    _diverged: DeviceCount = field(default_factory=DeviceCount, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_integer(self.iters) or self.iters < 0:
            raise ValueError(f"neumann: iters must be an integer >= 0, got {self.iters!r}")
        for name in ("warm_start", "simultaneous"):
            if not is_bool(getattr(self, name)):
                raise ValueError(
                    f"neumann: {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.warm_start and self.iters < 1:
            raise ValueError("neumann: warm_start needs iters >= 1")
        if self.simultaneous and not (self.warm_start and self.iters == 1):
            raise ValueError("neumann: simultaneous needs warm_start=true and iters=1")
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"neumann: alpha must be a finite number > 0, got {self.alpha!r}")
        if not (is_finite_number(self.damping) and self.damping >= 0):
            raise ValueError(f"neumann: damping must be a finite number >= 0, got {self.damping!r}")
        check_products(self.name, self.products, self.fd_step)

    def reset(self) -> None:
        """Forget the kept solution: the next call starts cold."""
        self._warm.reset()

    def state_dict(self) -> dict:
        return {**self._warm.state_dict(), "diverged": self._diverged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._warm.load_state_dict(state)
        self._diverged.load_state_dict(state.get("diverged"))

    def _residual(self, products, g: list[Tensor], v: list[Tensor]) -> list[Tensor]:
        """g - (H + damping I) v, in a fresh vector (the product's own output, reused)."""
        return self._residual_from(products.hvp(v), g, v)

    def _residual_from(self, hv: list[Tensor], g: list[Tensor], v: list[Tensor]) -> list[Tensor]:
        """g - (H + damping I) v given H v, in H v's storage."""
        if self.damping:
            torch._foreach_add_(hv, v, alpha=self.damping)
        torch._foreach_neg_(hv)
        torch._foreach_add_(hv, g)
        return hv

    def solve(self, products, g_outer: list[Tensor], inner_lr: float) -> Tensor:
        """dM/dw given the products and grad M (``inner_lr`` is not used).

        Memory: g, v and one product, three vectors shaped like the parameters, updated in
        place."""
        g = [t.detach() for t in g_outer]
        if self.simultaneous:
            return self._simultaneous(products, g)
        start = self._warm.start(g) if self.warm_start else None
        steps = self.iters
        if start is None:  # the first Richardson step from zero needs no product
            v = torch._foreach_mul(g, self.alpha)
        else:
            v = [t.clone() for t in start]
            residual = self._residual(products, g, v)
            _restart_if_worse(products, g, v, residual)
            torch._foreach_add_(v, residual, alpha=self.alpha)
            del residual
            steps -= 1
        grew = None
        for i in range(steps):
            residual = self._residual(products, g, v)
            if i == steps - 1:  # the last residual, on the device
                grew = products.dot(residual, residual) > GROWTH**2 * products.dot(g, g)
            torch._foreach_add_(v, residual, alpha=self.alpha)
            del residual
        out = -products.domain_jvp(v)
        if self.warm_start:
            self._warm.keep(v)  # after J_L v: a non-finite v is zeroed in place
        if grew is not None:
            self._diverged.add(grew)
            out = out.masked_fill(grew, float("nan"))
        return out

    def notes(self) -> list[str]:
        """What the run should be told at its end (one host read): in how many calls the
        series diverged (:data:`GROWTH`), whose hypergradients were NaN and so skipped."""
        count, calls = self._diverged.total(), self._diverged.calls
        if not count:
            return []
        return [
            f"the Neumann series diverged in {count} of {calls} hypergradients (its residual "
            f"grew to over {GROWTH:g} times |grad M|), which were skipped: lower solver.alpha="
            f"{self.alpha:g} (it needs alpha < 2 / the largest eigenvalue of the inner "
            "Hessian), or raise solver.damping where the inner loss has negative curvature"
        ]

    def _simultaneous(self, products, g: list[Tensor]) -> Tensor:
        """-J_L v with the kept v, and v moved one Richardson step: one product (module doc)."""
        start = self._warm.start(g)
        # cold: v = alpha g, the first Richardson step (no product)
        v = torch._foreach_mul(g, self.alpha) if start is None else [t.clone() for t in start]
        hv, jl = products.hvp_jvp(v)
        residual = self._residual_from(hv, g, v)
        # the default's guard, for the v kept for the next call: where the kept v leaves a
        # larger residual than zero would, the next v restarts from alpha g. This call still
        # returns -J_L of the kept v, which passed the previous call's guard (or is that
        # restart's alpha g, the default's fallback): zeroing it would stall the weights on a
        # problem where the guard fires at every step (alpha above 2 / lambda_max)
        _restart_if_worse(products, g, v, residual)
        torch._foreach_add_(v, residual, alpha=self.alpha)
        self._warm.keep(v)
        # the returned -J_L v does not read this call's grad M: mark it NaN where grad M is
        # (its smallest tensor carries the mark of a non-finite meta loss), so that a
        # non-finite meta loss is seen (and skipped) in the call that met it
        return poison_nonfinite(-jl, min(g, key=lambda t: t.numel()))


def _restart_if_worse(products, g: list[Tensor], v: list[Tensor], residual: list[Tensor]) -> None:
    """Restart from zero where the kept v is worse than nothing (|r| > |g|): the curvature
    turned, or v grew along a direction the problem no longer supports. In place and on the
    device: v becomes 0 and the residual g."""
    worse = ~(products.dot(residual, residual) <= products.dot(g, g))  # NaN: worse
    for vi, ri, gi in zip(v, residual, g):
        vi.mul_((~worse).to(vi.dtype))
        ri.copy_(torch.where(worse, gi, ri))
