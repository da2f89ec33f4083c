"""The solver interface shared by every hypergradient method."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from bilevel.functional import OuterLoss, Params, PerDomainLoss
from bilevel.solvers.products import Reduce

__all__ = ["Solver"]


@runtime_checkable
class Solver(Protocol):
    """A hypergradient method: the gradient of the outer loss with respect to the weight VALUES.

    ``domain_grad`` returns dM/dw, shape ``[K]``; :func:`bilevel.hypergradient` chains it through
    the weight parametrization. Implementations are small frozen dataclasses holding only their
    own options, so ``dataclasses.asdict(solver)`` is their configuration.

    Optional: ``state_dict()`` / ``load_state_dict(state)`` (checkpointed with the run, e.g. a
    warm start's kept solution), and ``notes() -> list[str]``, read once when a run ends (and
    when it stops because every outer update was skipped): what the user should be told, e.g.
    :class:`~bilevel.solvers.neumann.Neumann`'s count of diverged series.
    """

    name: str

    def domain_grad(
        self,
        per_domain_loss: PerDomainLoss,
        outer_loss: OuterLoss,
        params: Params,
        w: Tensor,
        inner_lr: float,
        reduce: Reduce | None = None,
    ) -> Tensor:
        """dM/dw ``[K]`` at weight values ``w`` ``[K]`` (each solver says what params means).

        ``reduce`` (optional) averages gradients and products across data-parallel ranks.
        """
        ...
