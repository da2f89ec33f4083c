"""Synthetic multi-step arithmetic solutions for a DreamPRM-style process reward model.

A problem is a start digit and ``steps`` operations (``+ d``, ``- d``, ``* d``, mod 10). A
*solver policy* writes a solution step by step: each step states the running value; with
probability ``error_rate`` it states a wrong digit, and later steps compute from whatever was
stated, so an early slip carries through. A solution's final answer is right when it equals the
true result. A step's label says whether that step's own arithmetic is right.

A step is featurized as one-hot(value it starts from, 10) | one-hot(operation, 3) |
one-hot(operand, 10) | one-hot(stated result, 10) | one-hot(position, steps): 33 + steps
features, enough for a per-step scorer to judge the step.

Training domains differ only in annotation quality:

=============== ======================================================================
``gold``         true step labels
``noisy_20``     each step label flipped with probability 0.2
``noisy_45``     flipped with probability 0.45 (barely informative)
``outcome``      every step labelled with the final answer's correctness (outcome-derived)
=============== ======================================================================

The meta set has no step labels, only whether each solution's final answer is right (for
``meta_candidates`` sampled solutions of each of ``meta_problems`` problems): that is what
DreamPRM's aggregation loss uses. The test set holds, for each of ``test_problems`` new
problems, ``candidates`` sampled solutions for best-of-N selection.
"""

from __future__ import annotations

import torch
from torch import nn

from bilevel import module_state
from bilevel.data.best_of_n import selection_accuracy
from bilevel.data.checks import check_counts, check_fractions, check_seed
from bilevel.data.columns import Columns, domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.functional import forward_batch
from bilevel.losses.prm import trajectory_logits

__all__ = ["PRM_DOMAINS", "prm_trajectories", "best_of_n", "sample_solutions"]

PRM_DOMAINS = ("gold", "noisy_20", "noisy_45", "outcome")
N_VALUES = (1, 2, 4, 8, 16, 32)


def sample_solutions(n: int, steps: int, error_rate: float, gen: torch.Generator) -> dict:
    """``n`` problems with one sampled solution each (see the module doc)."""
    start = torch.randint(0, 10, (n,), generator=gen)
    ops = torch.randint(0, 3, (n, steps), generator=gen)
    operands = torch.randint(0, 10, (n, steps), generator=gen)
    return solve(start, ops, operands, error_rate, gen)


def _apply(value: torch.Tensor, op: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    return (
        torch.where(
            op == 0, value + operand, torch.where(op == 1, value - operand, value * operand)
        )
        % 10
    )


def solve(start, ops, operands, error_rate: float, gen: torch.Generator) -> dict:
    """A policy's solutions to the given problems (one per row)."""
    n, steps = ops.shape
    true = start.clone()
    stated_prev = start.clone()
    feats, labels = [], []
    eye10, eye3, eyes = torch.eye(10), torch.eye(3), torch.eye(steps)
    for s in range(steps):
        true = _apply(true, ops[:, s], operands[:, s])
        right = _apply(stated_prev, ops[:, s], operands[:, s])
        slip = torch.rand(n, generator=gen) < error_rate
        # Slips are mostly systematic (off by one), as a model's habitual mistakes are, so wrong
        # final answers cluster and a majority vote can agree on one.
        shift = torch.where(
            torch.rand(n, generator=gen) < 0.7,
            torch.ones(n, dtype=torch.int64),
            torch.randint(1, 10, (n,), generator=gen),
        )
        wrong = (right + shift) % 10
        stated = torch.where(slip, wrong, right)
        feats.append(
            torch.cat(
                [
                    eye10[stated_prev],
                    eye3[ops[:, s]],
                    eye10[operands[:, s]],
                    eye10[stated],
                    eyes[s].expand(n, steps),
                ],
                dim=1,
            )
        )
        labels.append((~slip).float())
        stated_prev = stated
    return {
        "x": torch.stack(feats, 1),  # [n, steps, 33 + steps]
        "step_labels": torch.stack(labels, 1),
        "step_mask": torch.ones(n, steps),
        "outcome": (stated_prev == true).float(),
        "answer": stated_prev,
        "truth": true,
    }


@torch.no_grad()
def best_of_n(
    model: nn.Module, columns: Columns, device: torch.device, aggregation: str = "mean_logodds"
) -> dict[str, float]:
    """Best-of-N accuracy of the PRM, majority vote and random choice, for N in 1..32
    (:func:`bilevel.data.best_of_n.selection_accuracy`; ``columns`` hold
    ``problems * candidates`` solutions, grouped by problem)."""
    with module_state.evaluation(model):
        scores = trajectory_logits(forward_batch(model, columns), columns, aggregation)
    candidates = int(columns["candidates"][0])
    return selection_accuracy(scores, columns["outcome"], columns["answer"], candidates, N_VALUES)


def _candidates(problems: int, candidates: int, steps: int, error_rate: float, gen) -> dict:
    """``candidates`` sampled solutions for each of ``problems`` new problems, grouped."""
    first = sample_solutions(problems, steps, error_rate, gen)
    start = first["x"][:, 0, :10].argmax(1)
    ops = first["x"][:, :, 10:13].argmax(2)
    operands = first["x"][:, :, 13:23].argmax(2)
    sols = solve(
        start.repeat_interleave(candidates),
        ops.repeat_interleave(candidates, 0),
        operands.repeat_interleave(candidates, 0),
        error_rate,
        gen,
    )
    sols["problem"] = torch.arange(problems).repeat_interleave(candidates)
    sols["candidates"] = torch.full((problems * candidates,), candidates)
    return sols


def prm_trajectories(
    per_domain: int = 1500,
    steps: int = 6,
    error_rate: float = 0.25,
    meta_problems: int = 40,
    meta_candidates: int = 8,
    test_problems: int = 300,
    candidates: int = 32,
    seed: int = 0,
) -> DomainData:
    """Build the four annotation domains, the outcome-only meta set and the best-of-N test set."""
    check_counts(
        per_domain=(per_domain, 1),
        steps=(steps, 1),
        meta_problems=(meta_problems, 1),
        meta_candidates=(meta_candidates, 1),
        test_problems=(test_problems, 1),
        candidates=(candidates, 1),
    )
    check_fractions(error_rate=(error_rate, "(0, 1)"))
    gen = torch.Generator().manual_seed(check_seed(seed))
    parts = []
    for name in PRM_DOMAINS:
        sol = sample_solutions(per_domain, steps, error_rate, gen)
        labels = sol["step_labels"]
        if name.startswith("noisy_"):
            flip = torch.rand(labels.shape, generator=gen) < int(name.split("_")[1]) / 100
            labels = torch.where(flip, 1 - labels, labels)
        elif name == "outcome":
            labels = sol["outcome"][:, None].expand_as(labels).clone()
        parts.append({"x": sol["x"], "step_labels": labels, "step_mask": sol["step_mask"]})
    meta = _candidates(meta_problems, meta_candidates, steps, error_rate, gen)
    test = _candidates(test_problems, candidates, steps, error_rate, gen)
    return DomainData(
        names=list(PRM_DOMAINS),
        train=domain_columns(parts),
        meta={k: meta[k] for k in ("x", "step_mask", "outcome", "problem")},
        test=test,
        evaluate=best_of_n,
        model_kwargs={"in_dim": 33 + steps},
    )
