"""``ddp``: every rank holds the whole model (DistributedDataParallel under torchrun).

With one process (no torchrun) this is plain single-device training: no wrapper, and every
collective is the identity. Under torchrun the model is wrapped in DDP (gloo on CPU, NCCL on GPU)
for plain training steps; the hypergradient code takes its gradients from the unwrapped module
and averages them itself with one coalesced all-reduce (DDP only hooks ``.backward()``).
Checkpoints are one file written by rank 0 (every rank's random state gathered into it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.strategies import checkpoint as ckpt
from bilevel.strategies.base import Collectives
from bilevel.strategies.distributed import DistContext

__all__ = ["DDPStrategy"]


class DDPStrategy(Collectives):
    """Replicated parameters; gradients and products averaged over ranks."""

    name = "ddp"
    sharded = False

    def __init__(self, dist: DistContext | None = None, device: torch.device | None = None):
        self._join(dist or DistContext())
        self.device = device

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        device = self.device or next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def grads(self, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        grads = torch.autograd.grad(loss, list(params), allow_unused=True, materialize_grads=True)
        return self.reduce(list(grads))

    def reshard(self, module: nn.Module) -> None:
        return None

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    # -- checkpoints ------------------------------------------------------------------------------

    def model_state(self, module: nn.Module, keys: set[str]) -> dict[str, Any]:
        return {k: v for k, v in module.state_dict().items() if k in keys}

    def optimizer_state(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def restore(
        self, state: dict[str, Any], file: Path, module: nn.Module, optimizer: Any, keys: set[str]
    ) -> None:
        """Load the model entries and the inner optimizer's state from ``state``."""
        module.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["inner_optimizer"])

    def save(self, state: dict[str, Any], directory: Path) -> None:
        if self.is_main:
            ckpt.save_atomic(state, Path(directory) / "last.pt")

    def load(self, path: Path) -> dict[str, Any]:
        return ckpt.load(path, map_location="cpu")
