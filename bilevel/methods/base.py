"""The outer-method protocol: what turns one window of inner steps into an outer update.

The trainer runs windows of ``trainer.outer_every`` inner steps. A method owns its window: it
calls :class:`~bilevel.inner_loop.InnerLoop` for batches, inner steps, meta gradients and
hypergradient products, and hands back an :class:`OuterUpdate`: a gradient for the outer
optimizer, or new weight values. The trainer applies it (chain rule through the
parametrization, on-device skipping of non-finite updates, logging, checkpoints) and never
branches on the method.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from bilevel.inner_loop import InnerLoop

__all__ = ["OuterMethod", "OuterUpdate", "require_second_derivatives"]


@dataclass
class OuterUpdate:
    """What a window hands back.

    Attributes:
        grad: dM/dw, the gradient with respect to the weight VALUES (``[K]``, or the outer
            variables' coefficients); the trainer chains it through the parametrization and
            steps the outer optimizer.
        values: new weight values ``[K]`` (methods that set the weights directly: bandits).
        found: 0-d flag, nonzero to skip the update (non-finite); ``None``: the trainer checks
            ``grad`` / ``values`` itself.
        wrt_logits: ``grad`` is already the gradient of the outer variables' parameters (a
            meta-weight net's), not of the weight values.
    """

    grad: Tensor | None = None
    values: Tensor | None = None
    found: Tensor | None = None
    wrt_logits: bool = False


@runtime_checkable
class OuterMethod(Protocol):
    """One way of moving the domain weights. ``solver=<name>`` picks one.

    Attributes:
        name: recorded in ``summary.json``.
        uses_meta: whether the method reads the meta set (ODM and loss-based reweighting
            do not).

    Optional attributes: ``uses_outer_optimizer = False`` for a method that sets the weights
    by its own rule (``trainer.outer_optimizer`` has no effect: a note says so when it was
    chosen), ``moves_weights = False`` for one that never moves the domain weights.
    """

    name: str
    uses_meta: bool

    def setup(self, loop: InnerLoop) -> list[str]:
        """Check the combination (raise :class:`~bilevel.errors.ConfigError`), allocate state;
        returns notes for the run's first lines."""
        ...

    def window(self, loop: InnerLoop, n: int, update: bool) -> OuterUpdate | None:
        """Run ``n`` inner steps; when ``update``, end with an outer update (else ``None``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def require_second_derivatives(module, method: str) -> None:
    """Refuse (one line) autograd products through a model whose kernels lack them (fused
    attention, reentrant checkpointing): it says so in ``second_derivatives_missing``."""
    from bilevel.errors import ConfigError

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
