"""ScaleBiO: a fully first-order penalty method for data reweighting.

Pan et al., ACL 2025, "ScaleBiO: Scalable Bilevel Optimization for LLM Data Reweighting". The
bilevel problem min_w M(theta*(w)) is replaced by the penalized saddle problem

    min_{theta, w} max_u   M(theta) + alpha [ F_w(theta) - F_w(u) ],   F_w = sum_k w_k L_k,

whose u-maximization makes F_w(u) the lower-level optimum, so the bracket is >= 0 and vanishes
exactly when theta solves the inner problem too. Every inner step (all on the same batch):

* u (a second copy of the trainable parameters, with its own copy of the inner optimizer)
  descends F_w(u);
* theta descends F_w(theta) + M(theta) / alpha_t: the penalized objective divided by alpha_t,
  which is how the paper's schedule acts (alpha_i = alpha * tau^i with learning rates scaled by
  tau^-i); as alpha_t grows the meta term fades and theta approaches the inner solution;
* the window accumulates L_k(theta) - L_k(u), and the weights descend
  alpha * [L_w(theta) - L_w(u)] averaged over the window: the gradient of the penalty in w.

No second derivatives at all, so it runs wherever training runs (LoRA: the copy is only of the
trainable parameters). Cost per inner step: about two training steps plus one meta
forward/backward; memory: one more copy of the trainable parameters and of their optimizer
state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel import module_state
from bilevel.errors import ConfigError, is_finite_number, is_integer
from bilevel.functional import forward_batch
from bilevel.methods.base import OuterUpdate
from bilevel.optim import guarded_step

__all__ = ["ScaleBiO"]


@dataclass
class ScaleBiO:
    """The ScaleBiO penalty method (see the module doc).

    Args:
        alpha: the penalty weight alpha at the start.
        tau: its growth factor (>= 1), applied every ``alpha_every`` inner steps.
        alpha_every: inner steps between growths of alpha (the paper's outer iterations).
    """

    alpha: float = 1.0
    tau: float = 1.0
    alpha_every: int = 500
    name: str = "scalebio"
    _state: dict = field(default_factory=dict, repr=False, compare=False)

    uses_meta = True
    inner_lr_unused = "scalebio's penalty method assumes no inner step"

    def __post_init__(self) -> None:
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"scalebio: alpha must be a finite number > 0, got {self.alpha!r}")
        if not (is_finite_number(self.tau) and self.tau >= 1):
            raise ValueError(f"scalebio: tau must be a finite number >= 1, got {self.tau!r}")
        if not is_integer(self.alpha_every) or self.alpha_every < 1:
            raise ValueError(
                f"scalebio: alpha_every must be an integer >= 1, got {self.alpha_every!r}"
            )

    def alpha_at(self, step: int) -> float:
        return self.alpha * self.tau ** (step // self.alpha_every)

    def setup(self, loop) -> list[str]:
        if loop.strategy.sharded:
            raise ConfigError(
                "solver",
                "scalebio keeps a functional copy of the parameters; use trainer.strategy=ddp",
            )
        if loop.applies_weights:
            raise ConfigError(
                "trainer.sampling",
                f"scalebio differentiates the weighted loss; with sampling={loop.config.sampling} "
                "the sampler applies the weights instead (use uniform or size)",
            )
        u = [p.detach().clone().requires_grad_(True) for p in loop.params]
        opt = loop.inner_opt
        # the copy's optimizer has the inner optimizer's groups (their own learning rates and
        # decay), each over the copies of that group's tensors; it was built from the
        # optimizer's defaults, so a group's own lr did not reach u
        copy_of = {id(p): t for p, t in zip(loop.params, u)}
        groups = [
            {**_settings(group), "params": [copy_of[id(p)] for p in group["params"]]}
            for group in opt.param_groups
        ]
        try:
            u_opt = type(opt)(groups)
        except (TypeError, ValueError):
            u_opt = copy.deepcopy(opt)
            for group, mine in zip(u_opt.param_groups, groups, strict=True):
                group["params"] = mine["params"]
            u_opt.state.clear()
        self._state.update(u=u, u_opt=u_opt, step=0)
        count = sum(t.numel() for t in u)
        return [
            f"scalebio keeps a second copy of the {count:,} trainable parameters and of their "
            f"{type(opt).__name__} state"
        ]

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        u, u_opt = self._state["u"], self._state["u_opt"]
        names = loop.param_names
        diff = None
        for _ in range(n):
            batch = loop.next_batch()
            step = self._state["step"]
            alpha_t = self.alpha_at(step)
            # u descends F_w(u); its forward pass leaves the model's buffers to theta's steps
            # (put back after the backward, which may read them)
            with module_state.buffers_kept(loop.module):
                losses_u = loop.per_domain_loss(batch)(dict(zip(names, u)))
                grads = torch.autograd.grad(
                    loop.weighted(losses_u), u, allow_unused=True, materialize_grads=True
                )
            grads = loop.strategy.reduce(list(grads))
            found = loop.found_inf([*grads, losses_u.detach()])
            for t, g in zip(u, grads):
                t.grad = g
            # this step's learning rate (and whatever else the inner schedule moves, such as
            # OneCycleLR's momentum): u follows the schedule that theta's steps follow
            for mine, group in zip(u_opt.param_groups, loop.inner_opt.param_groups):
                mine.update(_settings(group))
            guarded_step(u_opt, found)
            # theta descends F_w(theta) + M(theta) / alpha_t
            meta = loop.meta_batch()

            def meta_term(meta=meta, alpha_t=alpha_t) -> Tensor:
                with loop.autocast():
                    value = loop.outer_loss(forward_batch(loop.module, meta), meta)
                loop.last["meta_value"] = value.detach()
                return value / alpha_t

            loop.inner_step(batch, extra=meta_term)
            delta = loop.last["domain_loss"] - losses_u.detach()
            diff = delta if diff is None else diff + delta
            self._state["step"] = step + 1
        if not update:
            return None
        # the penalty's gradient from each rank's batches, averaged over ranks: the weights
        # stay the same on every rank (they drifted apart under torchrun)
        (diff,) = loop.strategy.reduce([diff])
        return OuterUpdate(grad=self.alpha * diff / n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "u": [t.detach().clone() for t in self._state["u"]],
            "u_opt": self._state["u_opt"].state_dict(),
            "step": self._state["step"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, saved in zip(self._state["u"], state["u"]):
                t.copy_(saved)
        self._state["u_opt"].load_state_dict(state["u_opt"])
        self._state["step"] = int(state["step"])


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's settings without its tensors (a tensor lr is shared, not copied: a
    schedule fills it in place for both)."""
    return {k: v for k, v in group.items() if k not in ("params", "differentiable")}
