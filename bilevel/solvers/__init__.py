"""Hypergradient solvers, one method per module, built by name with :func:`build`.

A solver turns the inner problem's derivative products into dM/dw (:class:`Solver`). This
layer imports only the core (:mod:`bilevel.functional`, :mod:`bilevel.optim`, ...); the outer
methods a layer above (ScaleBiO, ODM, DoGE, ...) add themselves to :data:`SOLVERS` with
:func:`register`, so that ``build("scalebio")`` finds them without this package knowing them.

>>> from bilevel.solvers import build
>>> build("cg", iters=10, damping=0.0).iters
10
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bilevel.hypergradient import Solver, register_solver_builder
from bilevel.solvers.cg import ConjugateGradient
from bilevel.solvers.first_order import FirstOrder
from bilevel.solvers.neumann import Neumann
from bilevel.solvers.sama import SAMA
from bilevel.solvers.unrolled import Unrolled

__all__ = [
    "SOLVERS",
    "SAMA",
    "ConjugateGradient",
    "FirstOrder",
    "Neumann",
    "Solver",
    "Unrolled",
    "build",
    "options",
    "register",
]

#: every name ``build`` (and ``solver=<name>`` on the command line) knows, with its class
SOLVERS: dict[str, type] = {
    "first_order": FirstOrder,
    "unrolled": Unrolled,
    "neumann": Neumann,
    "cg": ConjugateGradient,
    "sama": SAMA,
}


def register(name: str, cls: type) -> None:
    """Make ``build(name)`` build ``cls`` (a dataclass of its options): how the outer methods
    of :mod:`bilevel.methods` that are not hypergradient solvers are chosen the same way."""
    SOLVERS[name] = cls


def options(name: str) -> list[str]:
    """The option names solver ``name`` accepts."""
    return [
        f.name
        for f in dataclasses.fields(SOLVERS[name])
        if f.name != "name" and not f.name.startswith("_")
    ]


def build(name: str, **opts: Any) -> Solver:
    """The solver called ``name`` with ``opts``; ``ValueError`` names the valid choices."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for solver {name!r}; "
            f"valid options: {', '.join(valid) if valid else '(none)'}"
        )
    return SOLVERS[name](**opts)


register_solver_builder(build)
