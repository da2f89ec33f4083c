"""The hypergradient method: a solver's dM/dw, then the outer optimizer (``first_order``,
``neumann``, ``cg``, ``sama`` and any user solver).

Where the products come from, cheapest first:

1. **The last inner step's graph** (autograd products, the loss weighted rather than the
   sampling): the window's last inner step keeps its gradient's graph, at theta_{T-1}, and the
   solver takes J_L v (and H u) from it, paired with grad M at theta_T after that step. For
   first_order this is -lr <grad L_k(theta_{T-1}), grad M(theta_T)>, the exact derivative of M
   through that SGD step; no extra forward pass.
2. **The module itself** (``products="finite_difference"``, and always under FSDP): H u and J_L v
   by central differences at theta_T on the window's last batch, perturbing the parameters (or
   their shards) in place.
3. **The public API** (:func:`bilevel.hypergradient`) on a fresh batch: for solvers that only
   have ``domain_grad`` (DoReMi, user solvers), and when the sampler applies the weights (the
   hypergradient then needs a batch with every domain: a uniform one).

``trainer.hessian_batch=independent`` takes the Hessian-vector products from a second, independent
batch at the same point: the same-batch estimate is biased (see the README).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bilevel.functional import trainable_params
from bilevel.hypergradient import hypergradient, takes_l2, uses_hessian
from bilevel.methods.base import OuterUpdate
from bilevel.methods.checks import check_fsdp_solver, require_second_derivatives
from bilevel.optim import l2_decay, preconditionable
from bilevel.outer import MirrorDescent
from bilevel.solvers.backends import HessianFrom, WithL2
from bilevel.solvers.products import InnerProducts

__all__ = ["HypergradientMethod"]

_KINKED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish)


class HypergradientMethod:
    """Any :class:`~bilevel.hypergradient.Solver` as an outer method."""

    uses_meta = True

    def __init__(self, solver: Any) -> None:
        self.solver = solver
        self.name = getattr(solver, "name", type(solver).__name__)
        self.path = "api"
        self._preconditioned = False
        self._l2: list[float] | None = None  # the inner optimizer's coupled weight decay

    @property
    def inner_lr_unused(self) -> str | None:
        """Why ``trainer.inner_lr`` does not enter this solver's hypergradient (``None``: it
        does, as first_order's v = inner_lr grad M and SAMA's fallback P = inner_lr I)."""
        if not getattr(self.solver, "uses_inner_lr", True):
            return f"{self.name} does not use it"
        if self.uses_hessian:
            return (
                f"{self.name} solves with the inner Hessian itself, where first_order assumes "
                "one inner step of that size"
            )
        if getattr(self.solver, "uses_optimizer", False) and self._preconditioned:
            return "sama takes its step from the inner optimizer's own update (its state and lr)"
        return None

    @property
    def uses_hessian(self) -> bool:
        """Whether the solver takes Hessian-vector products (``trainer.hessian_batch`` applies)."""
        return uses_hessian(self.solver)

    def setup(self, loop) -> list[str]:
        solver = self.solver
        products = getattr(solver, "products", "autograd")
        has_solve = callable(getattr(solver, "solve", None))
        notes: list[str] = []
        if loop.strategy.sharded:  # a strategy passed in, not named by trainer.strategy
            check_fsdp_solver(solver, hypergradient=True)
        if products != "finite_difference":
            require_second_derivatives(loop.module, f"solver={self.name}")
        if products == "finite_difference" and has_solve:
            self.path = "module"
        elif has_solve and not loop.applies_weights:
            self.path = "graph"
        else:
            self.path = "api"
        if products == "finite_difference" and self.name in ("cg", "neumann"):
            kinks = sorted({type(m).__name__ for m in loop.module.modules() if type(m) in _KINKED})
            if kinks:
                notes.append(
                    f"finite-difference Hessian-vector products differentiate gradients, which "
                    f"jump at the kinks of {', '.join(kinks)}: the products then include those "
                    "jumps (autograd's do not); prefer a smooth activation (GELU, SiLU, tanh) or "
                    "solver.products=autograd"
                )
        if self.uses_hessian and (self.path != "api" or takes_l2(solver)):
            self._l2 = l2_decay(loop.inner_opt, loop.params)
            if self._l2 is not None:
                notes.append(l2_note(self.name, self._l2, getattr(solver, "damping", 0)))
        check = getattr(solver, "check", None)
        if callable(check):  # a solver's own validation (e.g. DoReMi's reference run)
            check(loop)
        if getattr(solver, "uses_optimizer", False):
            loop.keep_last_grads = True
            self._preconditioned = preconditionable(loop.inner_opt)
            if not self._preconditioned:
                notes.append(
                    f"sama cannot precondition {type(loop.inner_opt).__name__} (it knows SGD, "
                    f"Adam, AdamW): it falls back to the identity times "
                    + (
                        "each parameter group's lr"
                        if isinstance(loop.hyper_lr(), list)
                        else f"inner_lr={loop.hyper_lr()}"
                    )
                )
        return notes

    def _solve(self, loop, products, g_outer) -> Any:
        if self._l2 is not None:
            products = WithL2(products, self._l2)
        kwargs: dict[str, Any] = {}
        if getattr(self.solver, "uses_optimizer", False):
            kwargs = dict(
                optimizer=loop.inner_opt,
                params=loop.params,
                last_grads=loop.last_grads,
                local=loop.strategy.local,
            )
        return self.solver.solve(products, g_outer, loop.hyper_lr(), **kwargs)

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        graph = update and self.path == "graph"
        for _ in range(n - graph):
            loop.inner_step(loop.next_batch())
        if not update:
            return None
        independent = loop.config.hessian_batch == "independent"
        if graph:
            products = loop.inner_step(loop.next_batch(), keep_graph=True)
            if independent:
                other = loop.per_domain_loss(loop.next_batch())
                hess = InnerProducts.at(
                    other, loop.param_names, products.theta, products.w, products.reduce
                )
                products = HessianFrom(products, hess)
            grad = self._solve(loop, products, loop.meta_gradient())
        elif self.path == "module":
            batch = loop.uniform_batch() if loop.applies_weights else loop.last_batch
            other = loop.next_batch() if independent else None
            if other is not None and loop.applies_weights:
                other = loop.uniform_batch()
            products = loop.module_products(batch, self.solver.fd_step, other)
            grad = self._solve(loop, products, loop.meta_gradient())
        else:
            grad = self._public_api(loop, independent)
        return OuterUpdate(grad=grad)

    def _public_api(self, loop, independent: bool):
        batch = loop.uniform_batch() if loop.applies_weights else loop.last_batch
        if batch is None:
            batch = loop.next_batch()
        other = None
        if independent:
            other = loop.per_domain_loss(
                loop.uniform_batch() if loop.applies_weights else loop.next_batch()
            )
        meta = loop.meta_batch()
        extra: dict[str, Any] = {}
        if getattr(self.solver, "uses_optimizer", False) and preconditionable(loop.inner_opt):
            # another optimizer: inner_lr * I, said once in the run's first lines
            extra = dict(optimizer=loop.inner_opt, last_grads=loop.last_grads)
        elif self._l2 is not None:  # its coupled weight decay, added to the Hessian
            extra = dict(optimizer=loop.inner_opt)
        grad = hypergradient(
            self.solver,
            loop.per_domain_loss(batch),
            loop.outer_loss_fn(meta),
            trainable_params(loop.module),
            loop.weights,
            loop.hyper_lr(),
            wrt="values",
            reduce=loop.strategy.reduce if loop.strategy.world_size > 1 else None,
            hessian_loss=other,
            **extra,
        )
        return grad

    def state_dict(self) -> dict[str, Any]:
        state_dict = getattr(self.solver, "state_dict", None)
        return {"solver": state_dict()} if callable(state_dict) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "solver" in state and callable(getattr(self.solver, "load_state_dict", None)):
            self.solver.load_state_dict(state["solver"])


def l2_note(name: str, l2: list[float], damping: float) -> str:
    """The run's first-lines note for an inner optimizer's coupled weight decay."""
    values = sorted({v for v in l2 if v})
    where = "" if all(l2) else f" on {sum(map(bool, l2))} of {len(l2)} parameter tensors"
    plus = f", plus solver.damping={damping}" if damping else ""
    return (
        f"{name}: the inner optimizer's weight_decay={', '.join(f'{v:g}' for v in values)}"
        f"{where} is an L2 term of the objective the inner steps minimize, so the solve "
        f"inverts that objective's Hessian, H + weight_decay I{plus}"
    )


def wants_values(outer_opt) -> bool:
    """Whether the outer optimizer steps on dM/dw itself (mirror descent) rather than on the
    logits' gradient."""
    return isinstance(outer_opt, MirrorDescent)
