"""Forward passes that are not training steps leave a module's state as they found it.

Two kinds of state change behind the caller's back:

**Buffers** (BatchNorm's running statistics and the like). In training mode a module updates
its running statistics on every forward pass. A hypergradient runs forward passes that are not
training steps: the meta loss on a meta batch, finite-difference passes at perturbed
parameters, a second batch for the Hessian, ScaleBiO's copy of the parameters. Each would move
the running statistics towards data or parameters the model is not trained on, and evaluation
(which uses them) would be silently off. The trainer keeps a copy of the buffers taken after a
window's last inner step (:func:`snapshot_buffers`) and puts it back when the window's outer
computation is done (:func:`restore_buffers`); :func:`buffers_kept` does both around a block.
Models without buffers pay nothing.

**Training modes**. ``model.eval()`` before an evaluation and ``model.train(was)`` after it is
the usual idiom, and it is wrong for a model whose submodules do not share one mode:
``train(True)`` sets *every* submodule to training, so a part the user keeps in eval mode on
purpose (BatchNorm layers frozen for fine-tuning, a frozen encoder with its dropout off) trains
from the first evaluation on, silently. :func:`modes_kept` and :func:`evaluation` save each
submodule's own flag and put it back, also when the evaluation raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "Snapshot",
    "buffers_kept",
    "evaluation",
    "modes_kept",
    "restore_buffers",
    "snapshot_buffers",
]

Snapshot = list[tuple[str, Tensor]]


def snapshot_buffers(module: nn.Module) -> Snapshot | None:
    """Copies of ``module``'s buffers by name (``None`` when it has none)."""
    saved = [(name, buf.detach().clone()) for name, buf in module.named_buffers()]
    return saved or None


@torch.no_grad()
def restore_buffers(module: nn.Module, saved: Snapshot | None) -> None:
    """Put the values of :func:`snapshot_buffers` back, in place."""
    for name, value in saved or []:
        module.get_buffer(name).copy_(value)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Forward passes inside leave ``module``'s buffers as they were."""
    saved = snapshot_buffers(module)
    try:
        yield
    finally:
        restore_buffers(module, saved)


@contextlib.contextmanager
def modes_kept(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, anything may change the modes (``module.eval()`` in a user's evaluator); on exit
    every submodule has its own flag back."""
    saved = [(sub, sub.training) for sub in module.modules()]
    try:
        yield module
    finally:
        for sub, flag in saved:
            sub.training = flag


@contextlib.contextmanager
def evaluation(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside; on exit every submodule has its own flag back."""
    with modes_kept(module):
        module.eval()
        yield module
