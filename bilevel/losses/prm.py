"""Process-reward-model losses on step logits ``[B, S]`` (one score per solution step).

Batches carry ``step_mask`` ``[B, S]`` (1 for real steps, 0 for padding), and
``step_labels`` ``[B, S]`` (inner: was each step right?) or ``outcome`` ``[B]`` (outer: was the
final answer right?).

DreamPRM's meta objective (Cao et al., 2025) trains the weights without step labels: the step
scores of a trajectory are aggregated into one trajectory score, which is compared with whether
the trajectory's final answer is right. DreamPRM's code uses the mean squared error at both
levels (:func:`step_mse` against Monte-Carlo step labels, and ``aggregation_loss(loss="mse")``);
the binary cross-entropy forms are kept as alternatives. ``aggregation`` chooses how:

* ``mean_logodds``: mean of the step log-odds, then a sigmoid (DreamPRM's choice);
* ``min``: the weakest step decides;
* ``product``: the probability that every step is right, prod_s sigmoid(l_s);
* ``last``: the score of the last step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.losses.precision import upcast
from bilevel.losses.shapes import expect_column, expect_output

_HINT = "one score per step; a [B, S, 1] head needs .squeeze(-1)"


def _steps(loss: str, output: Any, batch: Mapping[str, Any], *columns: str) -> Tensor:
    """The step logits ``[B, S]`` in ``output``, each named column shaped like them."""
    output = expect_output(loss, output, 2, "step logits [B, S]", _HINT)
    for name in columns:
        expect_column(loss, name, batch[name], output.shape, "one value per step [B, S]")
    return output


def _per_solution(loss: str, output: Tensor, batch: Mapping[str, Any], *columns: str) -> None:
    for name in columns:
        expect_column(loss, name, batch[name], output.shape[:1], "one value per solution [B]")


__all__ = [
    "AGGREGATIONS",
    "aggregation_loss",
    "pairwise_ranking_loss",
    "step_bce",
    "step_mse",
    "trajectory_logits",
]

AGGREGATIONS = ("mean_logodds", "min", "product", "last")


def step_mse(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Inner loss as DreamPRM's code: mean squared error between each step's probability
    sigmoid(logit) and its (soft, e.g. Monte-Carlo) label, over each trajectory's steps -> [B]."""
    output = _steps("step_mse", output, batch, "step_mask", "step_labels")
    probs = torch.sigmoid(upcast(output))
    mask = batch["step_mask"].to(probs.dtype)
    errors = (probs - batch["step_labels"].to(probs.dtype)) ** 2
    return (errors * mask).sum(1) / mask.sum(1).clamp_min(1)


def step_bce(output: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Inner loss: mean binary cross-entropy over each trajectory's real steps -> ``[B]``."""
    output = _steps("step_bce", output, batch, "step_mask", "step_labels")
    logits = upcast(output)
    mask = batch["step_mask"].float()
    losses = F.binary_cross_entropy_with_logits(
        logits, batch["step_labels"].to(logits.dtype), reduction="none"
    )
    return (losses * mask).sum(1) / mask.sum(1).clamp_min(1)


def trajectory_logits(output: Tensor, batch: Mapping[str, Any], aggregation: str) -> Tensor:
    """One logit per trajectory ``[B]`` from step logits ``[B, S]`` (see the module doc).

    For ``product`` the value is log P (a log-probability, not a logit); use
    :func:`aggregation_loss` or compare scores only within one aggregation.
    """
    output = _steps("trajectory_logits", output, batch, "step_mask")
    logits = upcast(output)
    mask = batch["step_mask"].float()
    if aggregation == "mean_logodds":
        return (logits * mask).sum(1) / mask.sum(1).clamp_min(1)
    if aggregation == "min":
        return torch.where(mask > 0, logits, torch.full_like(logits, torch.inf)).amin(1)
    if aggregation == "product":
        return (F.logsigmoid(logits) * mask).sum(1)
    if aggregation == "last":
        last = (mask.sum(1).long() - 1).clamp_min(0)
        return logits.gather(1, last[:, None]).squeeze(1)
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


def aggregation_loss(
    output: Tensor,
    batch: Mapping[str, Any],
    aggregation: str = "mean_logodds",
    loss: str = "bce",
) -> Tensor:
    """Outer loss: the aggregated trajectory score against ``batch["outcome"]``.

    ``loss="mse"`` is DreamPRM's: the squared error between the trajectory's probability
    (sigmoid of the aggregated logit) and whether its final answer is right; ``"bce"`` the
    binary cross-entropy of the same score.
    """
    if loss not in ("bce", "mse"):
        raise ValueError(f"aggregation_loss: loss must be bce or mse, got {loss!r}")
    score = trajectory_logits(output, batch, aggregation)
    _per_solution("aggregation_loss", score, batch, "outcome")
    outcome = batch["outcome"].to(score.dtype)
    if loss == "mse":
        prob = score.exp() if aggregation == "product" else torch.sigmoid(score)
        return ((prob - outcome) ** 2).mean()
    if aggregation == "product":  # score = log P(all steps right)
        log_p = score.clamp_max(-1e-6)
        log_not_p = torch.log(-torch.expm1(log_p))
        return -(outcome * log_p + (1 - outcome) * log_not_p).mean()
    return F.binary_cross_entropy_with_logits(score, outcome)


def pairwise_ranking_loss(
    output: Tensor, batch: Mapping[str, Any], aggregation: str = "mean_logodds"
) -> Tensor:
    """Outer loss for best-of-N: every right solution should outscore every wrong one of the
    same problem (``batch["problem"]`` ``[B]``): mean of softplus(s_wrong - s_right) -> scalar.

    Unlike :func:`aggregation_loss`, it depends only on how solutions of one problem are ranked,
    not on how calibrated the scores are.
    """
    score = trajectory_logits(output, batch, aggregation)
    _per_solution("pairwise_ranking_loss", score, batch, "outcome", "problem")
    outcome = batch["outcome"].to(score.dtype)
    problem = batch["problem"]
    pairs = (
        (problem[:, None] == problem[None, :]) & (outcome[:, None] > 0.5) & (outcome[None, :] < 0.5)
    ).float()
    margins = F.softplus(score[None, :] - score[:, None])  # [right i, wrong j]
    return (margins * pairs).sum() / pairs.sum().clamp_min(1)
