"""The outer variables: domain weights (one per domain) and per-example weights (a meta-weight
net of each example's loss and features, or a table of one weight per example), learned by
the same solvers.

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
from bilevel.weights.instance_table import InstanceTable
from bilevel.weights.meta_weight_net import MetaWeightNet
from bilevel.weights.per_example import PerExampleWeights

__all__ = [
    "PARAMETRIZATIONS",
    "DomainWeights",
    "InstanceTable",
    "MetaWeightNet",
    "PerExampleWeights",
    "apply_parametrization",
    "domain_names",
    "parametrization_vjp",
    "values_by_name",
]
