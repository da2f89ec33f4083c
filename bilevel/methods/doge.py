"""DoGE: gradient alignment with a target domain, stepped by exponentiated gradient.

Fan et al., ICML 2024, "DoGE: Domain Reweighting with Generalization Estimation". DoGE trains a
proxy model on the weighted mixture and, at each update, moves the weights towards the domains
whose gradients align with the gradient of the target domain (out-of-domain setting: the meta
set):

    W_k = <grad l_k(theta), grad l_target(theta)>,      w <- normalize(w * exp(eta * W)).

This is bilevel's ``first_order`` hypergradient, dM/dw_k = -inner_lr <grad L_k, grad M>, taken
by an entropic mirror-descent step w <- normalize(w * exp(-lr * dM/dw)): the same update with
eta = lr * inner_lr (checked in the tests against first_order + :class:`~bilevel.MirrorDescent`).
This module is that combination under DoGE's name, with the mirror-descent step built in, so
``solver=doge`` needs no other setting. Cost: first_order's. (DoGE uses the weights averaged
over the proxy run for its final model; the run's metrics.jsonl holds the whole trajectory.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.errors import ConfigError, is_finite_number
from bilevel.methods.base import OuterUpdate
from bilevel.methods.hypergradient import HypergradientMethod
from bilevel.solvers.first_order import FirstOrder

__all__ = ["DoGE"]


@dataclass
class DoGE:
    """first_order's dM/dw stepped by mirror descent on the simplex (see the module doc).

    Args:
        lr: the mirror-descent step on dM/dw (DoGE's eta = lr * inner_lr).
        smoothing: mix with the uniform distribution after each step.
        products: ``"autograd"`` or ``"finite_difference"``.
    """

    lr: float = 1.0
    smoothing: float = 0.0
    products: str = "autograd"
    name: str = "doge"
    _inner: Any = field(default=None, repr=False, compare=False)

    uses_meta = True
    uses_outer_optimizer = False  # sets the weights by its own rule

    def __post_init__(self) -> None:
        if not (is_finite_number(self.lr) and self.lr > 0):
            raise ValueError(f"doge: lr must be a finite number > 0, got {self.lr!r}")
        if not (is_finite_number(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"doge: smoothing must lie in [0, 1), got {self.smoothing!r}")
        self._inner = HypergradientMethod(FirstOrder(products=self.products))

    def setup(self, loop) -> list[str]:
        if loop.weights.parametrization != "softmax":
            raise ConfigError(
                "weights.parametrization",
                "doge's weights live on the simplex: use weights.parametrization=softmax",
            )
        return self._inner.setup(loop)

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        step = self._inner.window(loop, n, update)
        if step is None:
            return None
        grad = step.grad.to(torch.float64)
        w = loop.w.to(torch.float64)
        logits = torch.log(w.clamp_min(1e-300)) - self.lr * grad
        new = torch.softmax(logits, 0)
        if self.smoothing:
            new = (1 - self.smoothing) * new + self.smoothing / new.numel()
        found = (~torch.isfinite(grad).all()).float()
        return OuterUpdate(values=new.to(loop.w.dtype), found=found)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
