"""The strategy interface: how the model is spread over processes.

A strategy wraps the model, averages gradients and products across ranks, and saves and loads
checkpoints. The trainer and the outer methods call only these methods, so they never branch on
whether a run is single-process, data-parallel (DDP) or sharded (FSDP2); Lightning's
``Strategy`` classes play the same role.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from bilevel.strategies.distributed import DistContext

__all__ = ["Collectives", "Strategy"]


@runtime_checkable
class Strategy(Protocol):
    """How one run is laid out across processes.

    Attributes:
        name: ``"single"``, ``"ddp"`` or ``"fsdp"``.
        rank, world_size: this process and the number of processes.
        sharded: whether each rank holds only a shard of every parameter (FSDP); then vectors
            shaped like the parameters are local shards, and dot products sum across ranks.
    """

    name: str
    rank: int
    world_size: int
    sharded: bool

    @property
    def is_main(self) -> bool: ...

    def wrap(self, module: nn.Module) -> nn.Module:
        """Prepare ``module`` (already on its device); returns what plain training steps call."""
        ...

    def local(self, tensor: Tensor) -> Tensor:
        """The part of a parameter (or its gradient) this rank holds, as a plain tensor."""
        ...

    def grads(self, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        """d loss / d params averaged over ranks, as local tensors (zeros where unused)."""
        ...

    def reshard(self, module: nn.Module) -> None:
        """Drop any gathered copy of the parameters, so that the next forward pass reads the
        (possibly perturbed in place) local shards again. A no-op unless sharded."""
        ...

    def reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Mean of each tensor over ranks (identity on one process)."""
        ...

    def sum(self, tensor: Tensor) -> Tensor:
        """Sum of a per-rank partial result of a sharded quantity (identity when replicated)."""
        ...

    def broadcast_(self, tensor: Tensor) -> Tensor: ...

    def all_equal(self, tensor: Tensor) -> bool: ...

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def barrier(self) -> None: ...

    def model_state(self, module: nn.Module, keys: set[str]) -> dict[str, Any]:
        """The entries ``keys`` of the model's state dict, as this strategy checkpoints them."""
        ...

    def optimizer_state(self, module: nn.Module, optimizer: Any) -> dict[str, Any]: ...

    def restore(
        self, state: dict[str, Any], file: Path, module: nn.Module, optimizer: Any, keys: set[str]
    ) -> None:
        """Put the model entries and the inner optimizer's state of a loaded checkpoint back."""
        ...

    def save(self, state: dict[str, Any], directory: Path) -> None:
        """Write ``state`` as ``directory/last.pt`` (plus shards where the strategy has them),
        atomically: a crash leaves the previous checkpoint or the new one, never a mix."""
        ...

    def load(self, path: Path) -> dict[str, Any]:
        """The checkpoint file ``path`` (on the CPU)."""
        ...


class Collectives:
    """The process-group calls every strategy makes the same way, through its
    :class:`~bilevel.strategies.distributed.DistContext` (identities on one process); a
    strategy sets ``self.dist`` and inherits them. Only :meth:`Strategy.sum` differs (a
    sharded result sums over ranks, a replicated one does not)."""

    dist: DistContext

    def _join(self, dist: DistContext) -> None:
        self.dist = dist
        self.rank, self.world_size = dist.rank, dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        return self.dist.reduce(tensors)

    def broadcast_(self, tensor: Tensor) -> Tensor:
        return self.dist.broadcast_(tensor)

    def all_equal(self, tensor: Tensor) -> bool:
        return self.dist.all_equal(tensor)

    def gather_objects(self, obj: Any) -> list[Any]:
        return self.dist.gather_objects(obj)

    def broadcast_object(self, obj: Any) -> Any:
        return self.dist.broadcast_object(obj)

    def barrier(self) -> None:
        self.dist.barrier()
