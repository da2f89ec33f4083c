"""Outer methods: what turns a window of inner steps into an outer update of the weights.

``solver=<name>`` picks one. Hypergradient solvers (first_order, unrolled, neumann, cg, sama)
run behind :class:`HypergradientMethod` / :class:`UnrolledMethod`; the other methods are their
own modules (one file each) and implement :class:`OuterMethod` directly. This layer imports the
solvers and the core, never the trainer: what a method may use of the trainer's inner loop is
the :class:`Loop` protocol. It registers its methods with :func:`bilevel.solvers.register`, so
``bilevel.solvers.build("scalebio")`` builds them.
"""

from __future__ import annotations

from typing import Any

from bilevel.errors import ConfigError
from bilevel.methods.base import Loop, OuterMethod, OuterUpdate
from bilevel.methods.doge import DoGE
from bilevel.methods.hypergradient import HypergradientMethod
from bilevel.methods.loss_reweighting import LossReweighting
from bilevel.methods.odm import ODM
from bilevel.methods.per_example import PerExampleMethod
from bilevel.methods.scalebio import ScaleBiO
from bilevel.methods.unrolled import UnrolledMethod
from bilevel.solvers import register
from bilevel.solvers.unrolled import Unrolled

__all__ = [
    "METHOD_SOLVERS",
    "DoGE",
    "HypergradientMethod",
    "Loop",
    "LossReweighting",
    "ODM",
    "ScaleBiO",
    "OuterMethod",
    "OuterUpdate",
    "UnrolledMethod",
    "method_for",
]

#: methods chosen with ``solver=<name>`` that are not hypergradient solvers
METHOD_SOLVERS: dict[str, type] = {
    "scalebio": ScaleBiO,
    "odm": ODM,
    "loss_reweighting": LossReweighting,
    "doge": DoGE,
}
for _name, _method in METHOD_SOLVERS.items():
    register(_name, _method)


def method_for(solver: Any, weights: Any = None) -> OuterMethod:
    """The outer method that runs ``solver``: itself when it implements :class:`OuterMethod`
    (has ``window``), else the hypergradient or unrolled method around it (the per-example one
    for a meta-weight net)."""
    if getattr(weights, "per_example", False):
        if callable(getattr(solver, "window", None)) or isinstance(solver, Unrolled):
            raise ConfigError(
                "solver",
                f"per-example weights (weights={weights.parametrization}) are learned with "
                f"first_order, neumann, cg or sama, not {getattr(solver, 'name', solver)!r}",
            )
        return PerExampleMethod(solver)
    if callable(getattr(solver, "window", None)):
        return solver
    if isinstance(solver, Unrolled):
        return UnrolledMethod(solver)
    return HypergradientMethod(solver)
