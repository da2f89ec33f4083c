"""What the outer methods refuse before training, in one line each: a solver that cannot run on
sharded parameters (``trainer.strategy=fsdp``), and autograd products through a model whose
kernels have no double backward (fused attention, a ``torch.compile``'d module)."""

from __future__ import annotations

import sys
from typing import Any

from bilevel.errors import ConfigError
from bilevel.solvers.unrolled import Unrolled

__all__ = ["check_fsdp_solver", "require_second_derivatives"]


def check_fsdp_solver(solver: Any, hypergradient: bool = False) -> None:
    """FSDP needs forward/backward-only products: refuse what cannot run sharded.
    ``hypergradient``: ``solver`` is known to compute a hypergradient (then one without a
    ``products`` setting, or without the ``solve`` step that runs on the local shards, is
    refused too)."""
    if isinstance(solver, Unrolled):
        raise ConfigError(
            "solver",
            "unrolled differentiates through the inner steps (double backward), which sharded "
            "parameters do not allow: under trainer.strategy=fsdp use first_order, sama, "
            "neumann or cg with solver.products=finite_difference",
        )
    products = getattr(solver, "products", None)
    if products is None and not hypergradient:
        return  # a method without products (odm, doremi, ...) says itself what it refuses
    name = getattr(solver, "name", type(solver).__name__)
    if products != "finite_difference":
        raise ConfigError(
            "solver.products",
            f"trainer.strategy=fsdp shards the parameters, where double backward is not "
            f"available: use solver.products=finite_difference (solver {name!r} has "
            f"products={products or 'autograd'!r})",
        )
    if hypergradient and not callable(getattr(solver, "solve", None)):
        # a method with its own window (doge) checks the solver it runs inside it
        raise ConfigError(
            "solver",
            f"{name!r} has no solve step, which runs the products on the local shards under "
            "trainer.strategy=fsdp: use first_order, sama, neumann or cg",
        )


def require_second_derivatives(module, method: str) -> None:
    """Refuse (one line) autograd products through a model whose kernels lack them (fused
    attention, reentrant checkpointing): it says so in ``second_derivatives_missing``."""
    products = (
        "a solver with solver.products=finite_difference (unrolled has no other products)"
        if "unrolled" in method
        else "solver.products=finite_difference"
    )
    # torch.compile imports torch._dynamo; importing it here would cost every process ~2 s
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = eval_frame.OptimizedModule if eval_frame is not None else ()
    for sub in module.modules():
        if isinstance(sub, compiled):
            raise ConfigError(
                "model",
                f"a torch.compile'd model: its compiled backward takes no double backward "
                f"(torch frees its buffers after one), which {method} with autograd products "
                f"needs: use {products}, or pass the model uncompiled",
            )
        missing = getattr(sub, "second_derivatives_missing", None)
        if missing:
            field, what = missing
            raise ConfigError(
                field,
                f"{what} has no double backward or forward mode, which {method} with autograd "
                f"products needs: use {products}, or attn_implementation=eager and "
                "non-reentrant checkpointing",
            )
