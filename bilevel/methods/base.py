"""The outer-method protocol: what turns one window of inner steps into an outer update.

The trainer runs windows of ``trainer.outer_every`` inner steps. A method owns its window: it
calls the trainer's inner loop (what it may use is :class:`Loop`; the trainer's
:class:`~bilevel.trainer.inner_loop.InnerLoop` implements it) for batches, inner steps, meta
gradients and hypergradient products, and hands back an :class:`OuterUpdate`: a gradient for
the outer optimizer, or new weight values. The trainer applies it (chain rule through the
parametrization, on-device skipping of non-finite updates, logging, checkpoints) and never
branches on the method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Loop", "OuterMethod", "OuterUpdate"]


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


class Loop(Protocol):
    """What an outer method may use of the trainer's inner loop (a layer above this one): the
    model and its inner optimizer, batches, one inner step, the meta gradient and the
    functional forms of the losses. Every tensor stays on the device; nothing here reads a
    value back to the host.

    Attributes:
        config: the run's :class:`~bilevel.trainer.config.TrainerConfig`.
        strategy: how the model is spread over processes (``reduce``, ``local``, ``sharded``).
        device: where everything runs.
        module: the model (as the strategy laid it out); ``params`` / ``param_names``: its
            trainable tensors and their names; ``k``: the number of domains.
        weights: the outer variables; ``w``: their current values ``[K]``, detached.
        inner_opt, scheduler: the inner optimizer and its schedule (``None`` without one).
        train_sampler: the training batches' sampler (a method's own draws: ``draw``).
        skips: the device-side counts of skipped steps.
        last: the last inner step's values (``inner_loss``, ``domain_loss``, ``meta_value``).
        last_batch, last_per_example, last_grads, last_lr, last_step_sizes: the last inner
            step's batch, per-example losses, gradients (with ``keep_last_grads``) and
            learning rates.
        keep_last_grads: set by a method that needs the gradients of the last step (SAMA).
        outer_loss: the outer loss ``(output, batch) -> scalar``.
        applies_weights: whether the sampler applies the mixture (the objective is then the
            batch mean, not sum_k w_k L_k).
    """

    config: Any
    strategy: Any
    device: torch.device
    module: nn.Module
    params: list[Tensor]
    param_names: list[str]
    k: int
    weights: nn.Module
    w: Tensor
    inner_opt: torch.optim.Optimizer
    scheduler: Any
    train_sampler: Any
    skips: Any
    last: dict[str, Tensor]
    last_batch: dict[str, Any] | None
    last_per_example: Tensor | None
    last_grads: list[Tensor] | None
    last_lr: Any
    last_step_sizes: list[Any] | None
    keep_last_grads: bool
    outer_loss: Callable[[Any, Any], Tensor]

    @property
    def applies_weights(self) -> bool: ...

    def next_batch(self) -> dict[str, Any]:
        """The next training batch (drawn by ``trainer.sampling``)."""
        ...

    def uniform_batch(self) -> dict[str, Any]:
        """A batch with an equal share of every domain (for hypergradients)."""
        ...

    def meta_batch(self) -> dict[str, Any]:
        """The next meta batch (the whole meta set when ``meta_batch_size`` is null)."""
        ...

    def inner_step(self, batch: dict[str, Any], keep_graph: bool = False, **how: Any) -> Any:
        """One inner optimizer step on the weighted mixture; with ``keep_graph``, the step's
        gradient graph as products for the hypergradient."""
        ...

    def stepped(self) -> None:
        """Count an inner step that the method took itself (unrolled)."""
        ...

    def meta_gradient(self, meta: dict[str, Any] | None = None) -> list[Tensor]:
        """grad M at the current parameters (averaged over ranks)."""
        ...

    def module_products(
        self, batch: dict[str, Any], step: float | None = None, hessian_batch: Any = None
    ) -> Any:
        """Finite-difference products at the module's current parameters."""
        ...

    def per_domain_loss(self, batch: dict[str, Any]) -> Callable[[dict[str, Tensor]], Tensor]:
        """``params -> [K]`` on ``batch`` (what :func:`bilevel.hypergradient` takes)."""
        ...

    def outer_loss_fn(self, meta: dict[str, Any]) -> Callable[[dict[str, Tensor]], Tensor]:
        """``params -> scalar`` on ``meta``."""
        ...

    def weighted(self, losses: Tensor, w: Tensor | None = None) -> Tensor:
        """sum_k w_k L_k."""
        ...

    def found_inf(self, tensors: list[Tensor]) -> Tensor:
        """1.0 if any element is NaN/inf on any rank (a 0-d device tensor)."""
        ...

    def hyper_lr(self) -> float | list[Any]:
        """The step size the hypergradient assumes for an inner step."""
        ...

    def current_lr(self) -> Any: ...

    def current_step_sizes(self) -> list[Any] | None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...


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

    def setup(self, loop: Loop) -> list[str]:
        """Check the combination (raise :class:`~bilevel.errors.ConfigError`), allocate state;
        returns notes for the run's first lines."""
        ...

    def window(self, loop: Loop, n: int, update: bool) -> OuterUpdate | None:
        """Run ``n`` inner steps; when ``update``, end with an outer update (else ``None``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
