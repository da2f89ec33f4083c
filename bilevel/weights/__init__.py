"""The outer variables: domain weights (one per domain) and per-example weights (a meta-weight
net of each example's loss), learned by the same solvers.

It imports only the package's bottom modules (:mod:`bilevel.errors`); the solvers, methods and
trainer import it.
"""

from bilevel.weights.domain import (
    PARAMETRIZATIONS,
    DomainWeights,
    apply_parametrization,
    domain_names,
    parametrization_vjp,
    values_by_name,
)
from bilevel.weights.meta_weight_net import MetaWeightNet

__all__ = [
    "PARAMETRIZATIONS",
    "DomainWeights",
    "MetaWeightNet",
    "apply_parametrization",
    "domain_names",
    "parametrization_vjp",
    "values_by_name",
]
