"""The shipped inner and outer losses (classification, language modelling, process reward
models), built from configs with ``_target_`` + ``_partial_: true``. It imports only the core.

Inner losses map ``(output, batch)`` to one value per example ``[B]`` (the framework averages them
per domain with ``batch["domain"]``); outer losses map ``(output, batch)`` to a scalar.
"""

from bilevel.losses.classification import cross_entropy, per_example_cross_entropy
from bilevel.losses.lm import per_sequence_token_cross_entropy, token_cross_entropy
from bilevel.losses.prm import (
    aggregation_loss,
    pairwise_ranking_loss,
    step_bce,
    step_mse,
    trajectory_logits,
)

__all__ = [
    "aggregation_loss",
    "cross_entropy",
    "pairwise_ranking_loss",
    "per_example_cross_entropy",
    "per_sequence_token_cross_entropy",
    "step_bce",
    "step_mse",
    "token_cross_entropy",
    "trajectory_logits",
]
