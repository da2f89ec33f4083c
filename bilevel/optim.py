"""What the library knows about torch optimizers, and the step that skips non-finite updates.

Facts read off an optimizer, used by the solvers, the methods and the trainer alike: whether it
is plain SGD (p <- p - lr g, which ``unrolled`` differentiates exactly and the trainer steps
through one fused kernel), which coupled weight decay it adds to the inner objective (an implicit
solve inverts H + lambda I), and whether SAMA knows its update Jacobian.

The non-finite guard: find NaN/inf on the device and skip an update without a host sync. AMP's
grad scaler does the same for mixed precision: one fused kernel sets a 0-d ``found_inf``
flag, and the fused optimizers (SGD, Adam, AdamW with ``fused=True``) skip their update where it
is set, all on the device. Optimizers without that support fall back to reading the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bilevel.outer import LazyAdam, MirrorDescent

__all__ = [
    "found_inf",
    "guarded_step",
    "is_plain_sgd",
    "l2_decay",
    "plain_sgd_step",
    "preconditionable",
    "supports_device_skip",
]


def found_inf(tensors: Sequence[Tensor], one: Tensor) -> Tensor:
    """0-d float tensor: 1.0 if any element of ``tensors`` is NaN/inf, else 0.0 (one fused op;
    it multiplies by ``one``, i.e. changes nothing)."""
    found = torch.zeros((), device=one.device, dtype=torch.float32)
    torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, one)
    return found


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``found_inf`` on the device: a fused kernel in every
    group. torch marks the optimizer when it is built with ``fused=True``, and keeps the mark
    when a group turns the kernel off later (the trainer does under FSDP, whose sharded tensors
    the fused SGD kernel does not take): the step then failed with "Expected grad_scale and
    found_inf to be None"."""
    if isinstance(optimizer, MirrorDescent | LazyAdam):
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


def preconditionable(optimizer: Any) -> bool:
    """Whether :func:`optimizer_preconditioner` knows ``optimizer``'s update Jacobian."""
    return type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and not any(
        g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups
    )


#: optimizers whose ``weight_decay`` adds lambda * theta to the gradient: an L2 term
#: lambda/2 |theta|^2 of the objective they minimize (Adam, NAdam and RAdam unless
#: ``decoupled_weight_decay``; AdamW's decay is decoupled: it shrinks the parameters outside
#: the gradient, so its fixed point is not a stationary point of any one objective)
_COUPLED_DECAY = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.ASGD,
)


def l2_decay(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[float] | None:
    """The L2 coefficient that ``optimizer``'s coupled weight decay adds to the inner objective,
    one per tensor of ``params`` (by identity; 0.0 for a tensor it does not hold), or ``None``
    where it adds none: the objective the inner steps minimize is then the weighted loss plus
    sum_i lambda_i/2 |theta_i|^2, whose Hessian an implicit solve must invert (H + lambda I).
    Decoupled decay (AdamW, ``decoupled_weight_decay=True``) and optimizers this does not know
    count as none. A tensor learning rate or decay is not read here (it would synchronize); a
    number is."""
    if not isinstance(optimizer, _COUPLED_DECAY):
        return None
    decay_of: dict[int, float] = {}
    for group in optimizer.param_groups:
        value = group.get("weight_decay", 0.0)
        if group.get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW):
            value = 0.0
        value = float(value) if isinstance(value, Tensor) else value
        for p in group["params"]:
            decay_of[id(p)] = value
    decay = [float(decay_of.get(id(p), 0.0)) for p in params]
    return decay if any(decay) else None
