"""The unrolled method: exact reverse mode through the window's last ``steps`` real SGD steps.

The last ``solver.steps`` inner steps of each window are taken differentiably (each gradient
keeps its graph), with the learning rate the inner optimizer holds at each step and the scheduler
stepped after each, exactly like the plain steps; then M(theta_T) is differentiated back to the
weights. Nothing is computed twice, and the hypergradient is the derivative of the steps the
model really took (``trainer.inner_lr`` is not used: there is nothing to assume).
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel.errors import ConfigError
from bilevel.methods.base import OuterUpdate
from bilevel.methods.checks import require_second_derivatives
from bilevel.optim import is_plain_sgd
from bilevel.solvers.products import grads_or_zeros
from bilevel.solvers.unrolled import sgd_step

__all__ = ["UnrolledMethod"]


class UnrolledMethod:
    """:class:`~bilevel.solvers.Unrolled` run on the trainer's own inner steps."""

    uses_meta = True
    inner_lr_unused = "unrolled differentiates the real SGD steps at their own learning rate"

    def __init__(self, solver: Any) -> None:
        self.solver = solver
        self.name = solver.name

    def setup(self, loop) -> list[str]:
        if not is_plain_sgd(loop.inner_opt):
            raise ConfigError(
                "solver",
                "unrolled differentiates through the trainer's inner steps, which must then "
                "be plain SGD (torch.optim.SGD, momentum 0, weight_decay 0); use first_order, "
                "neumann, cg or sama with other inner optimizers",
            )
        if self.solver.steps > loop.config.outer_every:
            raise ConfigError(
                "solver.steps",
                f"unrolls {self.solver.steps} steps but trainer.outer_every is "
                f"{loop.config.outer_every}; it must be <= outer_every",
            )
        require_second_derivatives(loop.module, "solver=unrolled")
        if getattr(self.solver, "backend", "torch") != "torch":
            raise ConfigError(
                "solver.backend",
                f"the trainer differentiates its own inner steps with torch; backend="
                f"{self.solver.backend!r} is for bilevel.hypergradient cross-checks only",
            )
        if loop.strategy.world_size > 1:
            raise ConfigError(
                "solver", "unrolled is not supported under torchrun; use first_order or cg"
            )
        if loop.applies_weights:
            raise ConfigError(
                "trainer.sampling",
                f"unrolled differentiates the weighted loss of its steps; with "
                f"sampling={loop.config.sampling} the sampler applies the weights instead",
            )
        return []

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        unroll = self.solver.steps if update else 0
        for _ in range(n - unroll):
            loop.inner_step(loop.next_batch())
        if not update:
            return None
        names, params = loop.param_names, loop.params
        current = [p.detach().requires_grad_(True) for p in params]
        dtype = current[0].dtype
        w = loop.w.to(torch.promote_types(loop.w.dtype, dtype)).clone().requires_grad_(True)
        objectives = []
        for _ in range(unroll):
            batch = loop.next_batch()
            loop.last_batch = batch
            losses = loop.per_domain_loss(batch)(dict(zip(names, current)))
            objective = loop.weighted(losses, w)
            loop.last_lr = loop.current_lr()
            loop.last_step_sizes = sizes = loop.current_step_sizes()
            current = sgd_step(objective, current, loop.last_lr if sizes is None else sizes)
            loop.inner_opt._opt_called = True  # the step is taken here, not by opt.step()
            if loop.scheduler is not None:
                loop.scheduler.step()
            loop.stepped()
            objectives.append(objective)
            loop.last["domain_loss"] = losses.detach()
        meta = loop.meta_batch()
        meta_value = loop.outer_loss_fn(meta)(dict(zip(names, current)))
        loop.last["meta_value"] = meta_value.detach()
        (grad_w,) = grads_or_zeros(meta_value, [w])
        with torch.no_grad():
            new = [c.detach() for c in current]
            values = torch.stack([*[o.detach() for o in objectives], meta_value.detach()])
            found = loop.found_inf([values, *new])
            keep = found.bool()
            for p, fresh in zip(params, new):
                p.copy_(torch.where(keep, p, fresh))
        loop.last["inner_loss"] = objectives[-1].detach()
        loop.skips.add(found, inner=True, steps=unroll)
        grad = grad_w.detach()
        return OuterUpdate(
            grad=grad, found=torch.maximum(found, (~torch.isfinite(grad).all()).float())
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
