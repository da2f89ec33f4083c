"""``fsdp``: every parameter sharded over the ranks with FSDP2 (``torch.distributed.fsdp``).

Each rank holds 1/world_size of every parameter (and of its gradient and optimizer state); the
forward pass all-gathers a block's parameters just before it runs and frees them after, and
backward reduce-scatters the averaged gradients. Hypergradient products then cannot use double
backward (autograd would see the gathered copies, not the shards), so they are formed from
forward and backward passes only (``finite_difference`` products), which perturb the local
shards in place: :meth:`FSDPStrategy.reshard` drops the gathered copies so the next forward
reads the perturbed shards.

Wrapping: each transformer block of a Hugging Face model (the classes its ``_no_split_modules``
names) becomes its own FSDP unit, then the whole model; a small model (an MLP) is one unit.
``precision="bf16"`` runs the forward and backward in bfloat16 through FSDP's
``MixedPrecisionPolicy`` (gradients reduced in float32); the parameters, the domain weights and
the K-vector stay float32.

Checkpoints: model and inner-optimizer shards with ``torch.distributed.checkpoint`` (DCP) in
``checkpoints/shards-<step>/``; everything else (weights, outer optimizer, every rank's random
state, samplers, step, config) in ``checkpoints/last.pt``, written by rank 0 after the shards
are complete, so ``last.pt`` always names a finished set of shards. Resume needs the same
world size.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from bilevel.strategies import checkpoint as ckpt
from bilevel.strategies.base import Collectives
from bilevel.strategies.distributed import DistContext

__all__ = ["FSDPStrategy", "block_modules"]


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``module``: instances of the classes that its Hugging Face
    models list in ``_no_split_modules`` (empty for other models)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    if not names:
        return []
    return [m for m in module.modules() if type(m).__name__ in names]


class FSDPStrategy(Collectives):
    """Sharded parameters (FSDP2 ``fully_shard``) under torchrun."""

    name = "fsdp"
    sharded = True

    def __init__(self, dist: DistContext, device: torch.device, precision: str = "fp32"):
        if not dist.enabled:
            raise ValueError("fsdp needs torchrun with 2 or more processes")
        self._join(dist)
        self.device = device
        self.precision = precision

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        for block in block_modules(module):
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        return module

    def local(self, tensor: Tensor) -> Tensor:
        to_local = getattr(tensor, "to_local", None)
        return to_local() if to_local is not None else tensor

    def grads(self, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        """Backward through the sharded module (FSDP reduce-scatters the averaged gradient);
        the parameters' ``.grad`` are read as local shards and cleared."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss.backward()
        out = []
        for p, old in zip(params, saved):
            g = p.grad
            out.append(torch.zeros_like(self.local(p)) if g is None else self.local(g))
            p.grad = old
        return out

    def reshard(self, module: nn.Module) -> None:
        for sub in module.modules():
            reshard = getattr(sub, "reshard", None)
            if reshard is not None and hasattr(sub, "unshard"):
                reshard()

    def sum(self, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def model_state(self, module: nn.Module, keys: set[str]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {k: v for k, v in get_model_state_dict(module).items() if k in keys}

    def optimizer_state(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer)

    def restore(
        self, state: dict[str, Any], file: Path, module: nn.Module, optimizer: Any, keys: set[str]
    ) -> None:
        """Load the model and inner-optimizer shards that ``state`` (read from ``file``) names."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        template = {
            "model": self.model_state(module, keys),
            "inner_optimizer": self.optimizer_state(module, optimizer),
        }
        dcp.load(template, checkpoint_id=str(Path(file).parent / state["shards"]))
        set_model_state_dict(module, template["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(module, optimizer, template["inner_optimizer"])
        method = Path(file).parent / state["shards"] / f"method-rank{self.rank}.pt"
        state["method"] = ckpt.load_plain(method) if method.is_file() else {}

    def save(self, state: dict[str, Any], directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        name = f"shards-{int(state['step'])}"
        tmp = directory / f".{name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        sharded = {"model": state["model"], "inner_optimizer": state["inner_optimizer"]}
        dcp.save(sharded, checkpoint_id=str(tmp))
        # The method's state (a warm-started solution) is shaped like the local shards.
        torch.save(state.get("method") or {}, tmp / f"method-rank{self.rank}.pt")
        self.barrier()
        if self.is_main:
            final = directory / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            rest = {k: v for k, v in state.items() if k not in sharded and k != "method"}
            ckpt.save_atomic({**rest, "shards": name}, directory / "last.pt")
            for old in directory.glob("shards-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load(self, path: Path) -> dict[str, Any]:
        return ckpt.load(path, map_location="cpu")
