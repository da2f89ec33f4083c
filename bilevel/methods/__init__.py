"""Outer methods: what turns a window of inner steps into an outer update.

``solver=<name>`` picks one. Hypergradient solvers (first_order, unrolled, neumann, cg, sama)
run behind :class:`HypergradientMethod` / :class:`UnrolledMethod`; the other methods are their
own modules (one file each) and implement :class:`OuterMethod` directly.
"""

from __future__ import annotations

from typing import Any

from bilevel.methods.base import OuterMethod, OuterUpdate
from bilevel.methods.hypergradient import HypergradientMethod
from bilevel.methods.unrolled import UnrolledMethod

__all__ = [
    "METHOD_SOLVERS",
    "HypergradientMethod",
    "OuterMethod",
    "OuterUpdate",
    "UnrolledMethod",
    "method_for",
]

#: methods chosen with ``solver=<name>`` that are not hypergradient solvers
METHOD_SOLVERS: dict[str, type] = {}


def method_for(solver: Any) -> OuterMethod:
    """The outer method that runs ``solver``: itself when it implements :class:`OuterMethod`
    (has ``window``), else the hypergradient or unrolled method around it."""
    from bilevel.solvers.unrolled import Unrolled

    if callable(getattr(solver, "window", None)):
        return solver
    if isinstance(solver, Unrolled):
        return UnrolledMethod(solver)
    return HypergradientMethod(solver)
