"""Buffers (BatchNorm's running statistics and the like) belong to the inner steps alone.

In training mode a module updates its running statistics on every forward pass. A hypergradient
runs forward passes that are not training steps: the meta loss on a meta batch, finite-difference
passes at perturbed parameters, a second batch for the Hessian, ScaleBiO's copy of the
parameters. Each of them would move the running statistics towards data or parameters the model
is not trained on, and evaluation (which uses them) would be silently off. The trainer keeps a
copy of the buffers taken after a window's last inner step and puts it back when the window's
outer computation is done. Models without buffers pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["Snapshot", "kept", "restore", "snapshot"]

Snapshot = list[tuple[str, Tensor]]


def snapshot(module: nn.Module) -> Snapshot | None:
    """Copies of ``module``'s buffers by name (``None`` when it has none)."""
    saved = [(name, buf.detach().clone()) for name, buf in module.named_buffers()]
    return saved or None


@torch.no_grad()
def restore(module: nn.Module, saved: Snapshot | None) -> None:
    """Put the values of :func:`snapshot` back, in place."""
    for name, value in saved or []:
        module.get_buffer(name).copy_(value)


@contextlib.contextmanager
def kept(module: nn.Module) -> Iterator[None]:
    """Forward passes inside leave ``module``'s buffers as they were."""
    saved = snapshot(module)
    try:
        yield
    finally:
        restore(module, saved)
