"""The non-finite guard: find NaN/inf on the device and skip an update without a host sync.

AMP's grad scaler does the same for mixed precision: one fused kernel sets a 0-d ``found_inf``
flag, and the fused optimizers (SGD, Adam, AdamW with ``fused=True``) skip their update where it
is set, all on the device. Optimizers without that support fall back to reading the flag.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bilevel.outer import MirrorDescent

__all__ = [
    "SkipCounter",
    "found_inf",
    "guarded_step",
    "is_plain_sgd",
    "plain_sgd_step",
    "supports_device_skip",
]


def found_inf(tensors: Sequence[Tensor], one: Tensor) -> Tensor:
    """0-d float tensor: 1.0 if any element of ``tensors`` is NaN/inf, else 0.0 (one fused op;
    it multiplies by ``one``, i.e. changes nothing)."""
    found = torch.zeros((), device=one.device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, one)
    return found


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``found_inf`` on the device: a fused kernel in every
    group. torch marks the optimizer when it is built with ``fused=True``, and keeps the mark
    when a group turns the kernel off later (the trainer does under FSDP, whose sharded tensors
    the fused SGD kernel does not take): the step then failed with "Expected grad_scale and
    found_inf to be None"."""
    if isinstance(optimizer, MirrorDescent):
        return True
    return getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def guarded_step(optimizer: torch.optim.Optimizer, found: Tensor) -> None:
    """``optimizer.step()`` unless ``found`` is set (decided on the device when the optimizer
    supports it), then ``zero_grad``."""
    if supports_device_skip(optimizer):
        optimizer.grad_scale = None
        optimizer.found_inf = found
        optimizer.step()
    elif not bool(found):  # this optimizer cannot skip on the device: read the flag
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """``torch.optim.SGD`` without momentum, weight decay or maximize: p <- p - lr * g."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    return all(
        g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 and not g.get("maximize")
        for g in optimizer.param_groups
    )


def plain_sgd_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, found: Tensor
) -> None:
    """The update of a plain SGD optimizer through ``torch.optim``'s functional fused kernel:
    the same arithmetic without the optimizer wrapper's per-call bookkeeping; skipped on the
    device where ``found`` is set. ``params`` and ``grads`` are plain tensors (local shards
    under FSDP, whose sharded tensors the fused kernel does not take)."""
    sgd(
        list(params),
        list(grads),
        [None] * len(params),
        weight_decay=0.0,
        momentum=0.0,
        lr=lr,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        fused=True,
        grad_scale=None,
        found_inf=found,
    )


class SkipCounter:
    """Device-side counts of skipped inner steps and outer updates, and of the current runs of
    consecutive skips of each kind (read by the host only at log events).

    Inner and outer skips are counted separately: a run whose meta loss is NaN skips every outer
    update while its inner steps succeed, which one shared counter would keep resetting.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.inner, self.outer = zero.clone(), zero.clone()
        self.consecutive_inner, self.consecutive_outer = zero.clone(), zero.clone()

    def add(self, found: Tensor, inner: bool, steps: int = 1) -> None:
        found = found.to(self.inner.dtype)
        if inner:
            self.inner += found * steps
            self.consecutive_inner = (self.consecutive_inner + found * steps) * found
        else:
            self.outer += found
            self.consecutive_outer = (self.consecutive_outer + found) * found

    def totals(self) -> dict[str, int]:
        inner, outer = int(self.inner.item()), int(self.outer.item())
        return {"skipped_steps": inner + outer, "skipped_inner": inner, "skipped_outer": outer}

    def consecutive(self) -> tuple[int, int]:
        """(consecutive inner skips, consecutive outer skips) up to now (a host read)."""
        return int(self.consecutive_inner.item()), int(self.consecutive_outer.item())

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "skipped_inner": self.inner,
            "skipped_outer": self.outer,
            "consecutive_inner": self.consecutive_inner,
            "consecutive_outer": self.consecutive_outer,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.inner.device
        self.inner = state["skipped_inner"].to(device)
        self.outer = state["skipped_outer"].to(device)
        self.consecutive_inner = state["consecutive_inner"].to(device)
        self.consecutive_outer = state["consecutive_outer"].to(device)
