"""SAMA: the base Hessian as identity, the meta gradient preconditioned by the inner optimizer.

Choe et al., NeurIPS 2023, "Making Scalable Meta Learning Practical" (Betty's
``hypergradient/sama.py``). The implicit hypergradient -J_L H^-1 grad M needs an inverse Hessian;
SAMA replaces it by the Jacobian of the inner optimizer's update with respect to the gradient it
was given, P = -d(Delta theta)/d g, which is what the last inner step actually did with a
gradient. Then v = P grad M and dM/dw = -J_L v, one J_L v product (autograd or finite
differences), the cost of first_order.

P is diagonal for the optimizers handled here (derived from their update rules):

* SGD (optional momentum/dampening/nesterov): P = lr (1 - dampening) (times 1 + momentum for
  nesterov); plain SGD gives P = lr I, i.e. SAMA equals first_order with inner_lr = lr;
* Adam / AdamW (bias-corrected): with m, v the moments after the step, g the step's gradient,
  c1 = 1 - beta1^t, c2 = 1 - beta2^t, s = sqrt(v / c2):
  P = lr [ (1 - beta1) / c1 / (s + eps) - (m / c1) (1 - beta2) g / (c2 s (s + eps)^2) ].

Any other optimizer falls back to P = inner_lr I (said in the run's first lines).

Betty 0.2.1's SAMA differs in scale, not in idea: it takes P = I for SGD (no lr) and the Adam
derivative without bias correction (its leading term is (1 - beta1^t) / sqrt(1 - beta2^t)
times ours: 6.5 at step 10 with the default betas, 1.3 at step 1000). Compare the two only after
rescaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.optim import preconditionable
from bilevel.solvers.backends import check_products, jvp_at
from bilevel.solvers.products import Reduce, grad_outer, leaves, per_tensor, scaled

__all__ = ["SAMA", "optimizer_preconditioner"]


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


@torch.no_grad()
def optimizer_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    last_grads: Sequence[Tensor] | None,
    local=lambda t: t,
) -> list[Tensor] | None:
    """P (one tensor per parameter, shaped like it) for the optimizer's last step, or ``None``
    when the optimizer is not one :func:`preconditionable` handles (or has not stepped)."""
    if not preconditionable(optimizer):
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            return None
        lr = _float(group["lr"])
        if isinstance(optimizer, torch.optim.SGD):
            scale = lr * (1 - group.get("dampening", 0.0))
            if group.get("nesterov"):
                scale *= 1 + group.get("momentum", 0.0)
            out.append(torch.full_like(local(p), scale))
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg" not in state or last_grads is None:
            return None
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
        g = last_grads[i]
        # the step count stays where the optimizer keeps it (on the device for fused Adam):
        # reading it back would synchronize
        t = state["step"]
        if isinstance(t, Tensor):
            t = t.to(device=m.device, dtype=m.dtype)
        c1, c2 = 1 - beta1**t, 1 - beta2**t
        s = (v / c2).sqrt()
        coupled = type(optimizer) is torch.optim.Adam and not group.get("decoupled_weight_decay")
        if coupled and group.get("weight_decay"):
            # Adam's L2 term enters the gradient at the parameters before the step, which the
            # step itself gives back: theta_before = theta + lr * m_hat / (s + eps)
            before = local(p) + lr * (m / c1) / (s + eps)
            g = g + group["weight_decay"] * before
        first = (1 - beta1) / c1 / (s + eps)
        second = torch.where(
            s > 0, (m / c1) * (1 - beta2) * g / (c2 * s.clamp_min(1e-30) * (s + eps) ** 2), 0.0
        )
        out.append(lr * (first - second))
    return out


@dataclass(frozen=True)
class SAMA:
    """v = P grad M, P the inner optimizer's update Jacobian (see the module doc); dM/dw = -J_L v.

    Without an optimizer (the public API called without one), P = inner_lr I.
    """

    products: str = "autograd"
    fd_step: float | None = None
    name: str = "sama"
    uses_optimizer = True

    def __post_init__(self) -> None:
        check_products(self.name, self.products, self.fd_step)

    def direction(
        self,
        g_outer: Sequence[Tensor],
        inner_lr: float,
        optimizer: Any = None,
        params: Sequence[Tensor] | None = None,
        last_grads: Sequence[Tensor] | None = None,
        local=lambda t: t,
    ) -> list[Tensor]:
        """v = P grad M (identity * inner_lr when P is not available)."""
        pre = None
        if optimizer is not None and params is not None:
            pre = optimizer_preconditioner(optimizer, params, last_grads, local)
        if pre is None:
            steps = inner_lr if per_tensor(inner_lr) else [inner_lr]
            if not all(isinstance(s, Tensor) or math.isfinite(s) for s in steps):
                raise ValueError(f"sama: inner_lr must be finite, got {inner_lr}")
            return scaled([g.detach() for g in g_outer], inner_lr)
        return torch._foreach_mul([g.detach() for g in g_outer], pre)

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
        hessian_loss: PerDomainLoss | None = None,
        optimizer: Any = None,
        last_grads: Sequence[Tensor] | None = None,
        optimizer_params: Sequence[Tensor] | None = None,
    ) -> Tensor:
        names, theta = leaves(params)
        g_outer = grad_outer(outer_loss, names, theta, reduce)
        v = self.direction(g_outer, inner_lr, optimizer, optimizer_params, last_grads)
        return -jvp_at(self.products, per_domain_loss, names, theta, v, w, reduce, self.fd_step)

    def solve(
        self,
        products,
        g_outer: list[Tensor],
        inner_lr: float,
        optimizer: Any = None,
        params: Sequence[Tensor] | None = None,
        last_grads: Sequence[Tensor] | None = None,
        local=lambda t: t,
    ) -> Tensor:
        v = self.direction(g_outer, inner_lr, optimizer, params, last_grads, local)
        return -products.domain_jvp(v)
