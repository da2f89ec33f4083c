"""How a run is laid out across processes: ``ddp`` (replicated; one process without torchrun)
and ``fsdp`` (FSDP2 sharding), both behind :class:`~bilevel.strategies.base.Strategy`, with
the plumbing they share: joining torchrun's process group (:mod:`.distributed`) and checkpoint
files that load with the safe unpickler (:mod:`.checkpoint`). It imports only the core."""

from __future__ import annotations

import torch

from bilevel.errors import ConfigError
from bilevel.strategies.base import Strategy
from bilevel.strategies.ddp import DDPStrategy
from bilevel.strategies.distributed import DistContext
from bilevel.strategies.fsdp import FSDPStrategy

__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "FSDPStrategy",
    "Strategy",
    "build_strategy",
    "fsdp_needs_processes",
]

STRATEGIES = ("ddp", "fsdp")


def fsdp_needs_processes() -> ConfigError:
    """The error for ``trainer.strategy=fsdp`` in a single process."""
    return ConfigError(
        "trainer.strategy",
        "fsdp shards the model over processes: launch with torchrun --nproc_per_node=N "
        "(N >= 2), or use trainer.strategy=ddp",
    )


def build_strategy(
    name: str, dist: DistContext, device: torch.device, precision: str = "fp32"
) -> Strategy:
    """The strategy ``name`` for this process; ``fsdp`` needs torchrun with >= 2 ranks."""
    if name == "ddp":
        return DDPStrategy(dist, device)
    if name == "fsdp":
        if not dist.enabled:
            raise fsdp_needs_processes()
        return FSDPStrategy(dist, device, precision)
    raise ConfigError("trainer.strategy", f"unknown strategy {name!r}; valid: ddp, fsdp")
