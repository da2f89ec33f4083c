"""``bilevel.hypergradient``: d outer_loss / d weight logits for any solver.

This module defines what a solver is (:class:`Solver`, a protocol) and calls one; the solvers
themselves live a layer above, in :mod:`bilevel.solvers`, which registers how a solver's name
becomes a solver (:func:`register_solver_builder`), so ``hypergradient("cg", ...)`` works
without this module importing them."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from bilevel.errors import is_finite_number
from bilevel.functional import OuterLoss, Params, PerDomainLoss, Reduce
from bilevel.optim import l2_decay, preconditionable
from bilevel.weights import DomainWeights, parametrization_vjp

__all__ = ["Solver", "chain_through_parametrization", "hypergradient", "register_solver_builder"]


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


#: turns a solver's name into a solver (:func:`bilevel.solvers.build`, registered by
#: :mod:`bilevel.solvers` when it is imported, which ``import bilevel`` does)
_build_by_name: Callable[[str], Any] | None = None


def register_solver_builder(build: Callable[[str], Any]) -> None:
    """Let :func:`hypergradient` take a solver's name: ``build(name)`` makes the solver."""
    global _build_by_name
    _build_by_name = build


def _built(name: str) -> Any:
    if _build_by_name is None:  # only when bilevel.hypergradient is loaded without bilevel
        raise TypeError(
            f"solver {name!r} given by name, but no solver is registered: import bilevel"
        )
    return _build_by_name(name)


def chain_through_parametrization(weights: DomainWeights, grad_values: Tensor) -> Tensor:
    """J_p(logits)^T grad_values: turns dM/dw ``[K]`` into dM/dlogits ``[K]``."""
    return parametrization_vjp(weights.parametrization, weights.logits, grad_values)


def _check_arguments(solver, params, weights, inner_lr, wrt) -> Solver:
    """Refuse, with the argument named, what would otherwise fail deep inside a solver or,
    worse, return a wrong number (a negative ``inner_lr`` flips the sign of first_order's and
    unrolled's result). A solver's name stands for ``build(name)``."""
    if isinstance(solver, str):
        solver = _built(solver)
    if not callable(getattr(solver, "domain_grad", None)) and callable(
        getattr(solver, "window", None)
    ):
        raise TypeError(
            f"{getattr(solver, 'name', type(solver).__name__)} is a method of the trainer (it "
            "needs a window of inner steps, not one point) and has no hypergradient to return: "
            "run it with bilevel.BilevelTrainer; bilevel.hypergradient takes first_order, "
            "unrolled, neumann, cg or sama"
        )
    if not callable(getattr(solver, "domain_grad", None)):
        raise TypeError(
            f"solver must come from bilevel.solvers.build (or be a solver's name), got {solver!r}"
        )
    if not isinstance(weights, DomainWeights):
        raise TypeError(f"weights must be a bilevel.DomainWeights, got {type(weights).__name__}")
    if not isinstance(params, dict) or not params:
        raise TypeError(
            "params must be a non-empty dict[str, Tensor] (e.g. dict(model.named_parameters()))"
            f", got {type(params).__name__} {'(empty)' if isinstance(params, dict) else ''}"
        )
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"params[{name!r}] must be a Tensor, got {type(value).__name__}")
        if isinstance(value, torch.nn.Parameter) and not value.requires_grad:
            # a frozen base weight passed with the trainable ones (dict(model.named_parameters())
            # of a LoRA model): the solvers would treat it as an inner variable that the inner
            # loop moves, and return the hypergradient of another problem
            raise ValueError(
                f"params[{name!r}] is a frozen parameter (requires_grad=False): params are the "
                "inner variables that the inner optimizer trains; pass only those, e.g. "
                "bilevel.trainable_params(model)"
            )
    # >= 0: a schedule may end at 0. A tensor (a scheduler's device lr) is not read: no sync.
    steps = list(inner_lr) if isinstance(inner_lr, list | tuple) else [inner_lr]
    if isinstance(inner_lr, list | tuple) and len(steps) != len(params):
        raise ValueError(
            f"inner_lr: one step size per tensor of params ({len(params)}), got {len(steps)}"
        )
    for step in steps:
        if not isinstance(step, Tensor) and not (is_finite_number(step) and step >= 0):
            raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr!r}")
    if wrt not in ("logits", "values"):
        raise ValueError(f"wrt must be 'logits' or 'values', got {wrt!r}")
    return solver


def uses_hessian(solver) -> bool:
    """Whether ``solver`` takes Hessian-vector products of the inner objective."""
    return getattr(solver, "uses_hessian", getattr(solver, "name", None) in ("cg", "neumann"))


def takes_l2(solver) -> bool:
    """Whether ``solver.domain_grad`` takes ``l2`` (the inner optimizer's coupled weight decay,
    added to the Hessian): bilevel's cg and neumann do; a user's solver may not."""
    try:
        return "l2" in inspect.signature(solver.domain_grad).parameters
    except (TypeError, ValueError):
        return False


def _check_order(params_of: list[Tensor], params: Params) -> None:
    """The optimizer must hold the inner variables in the order of ``params``."""
    shapes = [tuple(t.shape) for t in params.values()]
    if [tuple(p.shape) for p in params_of] != shapes:
        raise ValueError(
            f"optimizer: its {len(params_of)} parameter(s) must be the inner variables in the "
            f"order of params ({len(shapes)} tensor(s) shaped {shapes})"
        )


def _check_optimizer(optimizer, params_of: list[Tensor], params: Params, last_grads) -> None:
    """For sama's preconditioner: the optimizer must hold the inner variables in the order of
    ``params`` and, for Adam/AdamW, have stepped and come with the gradients of that step.
    Each of these fell back to ``inner_lr * I`` silently (or failed with an IndexError), so
    the optimizer the caller passed was not what preconditioned the result."""
    _check_order(params_of, params)
    shapes = [tuple(t.shape) for t in params.values()]
    if not preconditionable(optimizer):
        warnings.warn(
            f"sama knows the update Jacobian of SGD, Adam and AdamW (without amsgrad or "
            f"maximize), not of this {type(optimizer).__name__}: it uses inner_lr * I",
            stacklevel=3,
        )
        return
    if isinstance(optimizer, torch.optim.SGD):
        return
    if last_grads is None or len(last_grads) != len(shapes):
        got = "none" if last_grads is None else f"{len(last_grads)}"
        raise ValueError(
            f"last_grads: sama with {type(optimizer).__name__} needs the gradients of the "
            f"optimizer's last step, one per parameter ({len(shapes)}), got {got}"
        )
    if not any("exp_avg" in optimizer.state.get(p, {}) for p in params_of):
        raise ValueError(
            f"optimizer: this {type(optimizer).__name__} has not taken a step, so it has no "
            "moments for sama's preconditioner: call the hypergradient after an inner step"
        )


def hypergradient(
    solver: Solver | str,
    per_domain_loss: PerDomainLoss,
    outer_loss: OuterLoss,
    params: Params,
    weights: DomainWeights,
    inner_lr: float = 0.1,
    wrt: Literal["logits", "values"] = "logits",
    reduce: Reduce | None = None,
    hessian_loss: PerDomainLoss | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    last_grads: list[Tensor] | None = None,
) -> Tensor:
    """The hypergradient of ``outer_loss`` with respect to the domain weights.

    Args:
        solver: from :func:`bilevel.solvers.build`, or a solver's name (its defaults).
        per_domain_loss: ``params -> Tensor[K]``, the mean inner loss of each domain.
        outer_loss: ``params -> scalar``, the meta loss M.
        params: ``dict[str, Tensor]``; the inner solution theta*(w) for implicit solvers, the
            start point theta_0 for ``unrolled``. Not modified. Only the inner variables (what
            the inner optimizer trains: :func:`bilevel.trainable_params`); frozen weights stay
            in the model, so a frozen ``nn.Parameter`` here is refused.
        weights: the :class:`~bilevel.DomainWeights` whose logits the result refers to.
        inner_lr: the inner SGD learning rate (used by ``first_order``, ``unrolled`` and
            ``sama`` without an optimizer): one number, or a list with one per tensor of
            ``params`` (an optimizer whose parameter groups have learning rates of their own).
        wrt: ``"logits"`` (default: dM/dlogits, shaped like ``weights.logits``) or ``"values"``
            (dM/dw, what mirror descent uses).
        reduce: for data-parallel training, averages gradients and products across ranks in
            place (see :mod:`bilevel.strategies.distributed`); ``None`` on one process.
        hessian_loss: the per-domain loss on an independent batch; when given, the implicit
            solvers take their Hessian-vector products from it (and J_L from
            ``per_domain_loss``), so the two factors of the estimate do not share one
            minibatch's noise (see "H from an independent batch" in the docs' Long runs).
        optimizer: the inner optimizer (its parameters in the order of ``params``). For
            ``sama``, with ``last_grads``: its update Jacobian preconditions the meta gradient
            (without them sama uses ``inner_lr * I``). For ``cg`` and ``neumann``: its
            coupled weight decay lambda (SGD, Adam, RMSprop, ... ``weight_decay``; not
            AdamW's) is an L2 term of the objective the inner steps minimize, so the solve
            inverts H + lambda I, the Hessian of that objective.
        last_grads: for ``sama`` with Adam or AdamW, the gradients of the optimizer's last
            step, one per tensor of ``params``.

    Returns:
        Tensor ``[K]`` on the logits' device and dtype. Non-finite entries are returned as they
        are; the caller decides what to do with them.

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.solvers import build
        >>> w = bilevel.DomainWeights(["a", "b"])
        >>> theta = {"x": torch.zeros(1)}
        >>> per_domain = lambda p: torch.stack([(p["x"] - 1) ** 2, (p["x"] + 1) ** 2]).flatten()
        >>> meta = lambda p: ((p["x"] - 1) ** 2).sum()
        >>> bilevel.hypergradient(build("first_order"), per_domain, meta, theta, w, 0.1)
        tensor([-0.2000,  0.2000])
    """
    solver = _check_arguments(solver, params, weights, inner_lr, wrt)
    values = weights.value().detach()
    extra: dict = {}
    if hessian_loss is not None:
        extra["hessian_loss"] = hessian_loss
    if optimizer is not None and getattr(solver, "uses_optimizer", False):
        params_of = [p for g in optimizer.param_groups for p in g["params"]]
        _check_optimizer(optimizer, params_of, params, last_grads)
        extra.update(optimizer=optimizer, last_grads=last_grads, optimizer_params=params_of)
    elif optimizer is not None and uses_hessian(solver):
        params_of = [p for g in optimizer.param_groups for p in g["params"]]
        _check_order(params_of, params)
        l2 = l2_decay(optimizer, params_of)
        if l2 is not None and takes_l2(solver):
            extra["l2"] = l2
        elif l2 is not None:
            warnings.warn(
                f"{getattr(solver, 'name', type(solver).__name__)}.domain_grad takes no l2: the "
                "optimizer's weight decay is not added to the Hessian",
                stacklevel=2,
            )
    with torch.enable_grad():
        try:
            grad_values = solver.domain_grad(
                per_domain_loss, outer_loss, params, values, inner_lr, reduce=reduce, **extra
            )
        except RuntimeError as err:
            if "donated buffers" not in str(err):
                raise
            raise RuntimeError(
                "the losses run a torch.compile'd model, whose compiled backward takes no "
                "double backward, which autograd products need: build the solver with "
                "products='finite_difference', or call the model uncompiled"
            ) from err
    grad_values = grad_values.detach().to(weights.logits.dtype)
    if wrt == "values":
        return grad_values
    return chain_through_parametrization(weights, grad_values)
