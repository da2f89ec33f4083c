"""Hypergradient solvers, one method per module, built by name with :func:`build`.

>>> from bilevel.solvers import build
>>> build("cg", iters=10, damping=0.0).iters
10
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bilevel.solvers.base import Solver
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
]

SOLVERS: dict[str, type] = {
    "first_order": FirstOrder,
    "unrolled": Unrolled,
    "neumann": Neumann,
    "cg": ConjugateGradient,
    "sama": SAMA,
}


def _register_methods() -> None:
    # Outer methods that are not hypergradient solvers but are chosen the same way
    # (``solver=scalebio``, ``solver=odm``, ...): imported here so ``build`` finds them.
    from bilevel.methods import METHOD_SOLVERS

    SOLVERS.update(METHOD_SOLVERS)


def options(name: str) -> list[str]:
    """The option names solver ``name`` accepts."""
    return [
        f.name
        for f in dataclasses.fields(SOLVERS[name])
        if f.name != "name" and not f.name.startswith("_")
    ]


def build(name: str, **opts: Any) -> Solver:
    """The solver called ``name`` with ``opts``; ``ValueError`` names the valid choices."""
    _register_methods()
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
