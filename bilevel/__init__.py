"""bilevel: learn domain weights by bilevel meta-learning.

lower level:  theta*(w) = argmin_theta sum_k w_k L_k(theta)
upper level:  min_lambda M(theta*(p(lambda)))

Public API: :class:`DomainWeights`, :func:`hypergradient`, :mod:`bilevel.solvers`,
:class:`BilevelTrainer`.
"""

from bilevel.functional import (
    make_outer_loss,
    make_per_domain_loss,
    segment_mean,
    trainable_params,
)
from bilevel.hypergradient import hypergradient
from bilevel.outer import MirrorDescent
from bilevel.trainer import BilevelTrainer, TrainerConfig
from bilevel.weights import DomainWeights

__version__ = "0.1.0"

__all__ = [
    "BilevelTrainer",
    "DomainWeights",
    "MirrorDescent",
    "TrainerConfig",
    "hypergradient",
    "make_outer_loss",
    "make_per_domain_loss",
    "segment_mean",
    "trainable_params",
]
