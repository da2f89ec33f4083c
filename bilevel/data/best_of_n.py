"""Best-of-N selection metrics for a process reward model (DreamPRM's evaluation).

A test set for a PRM holds ``candidates`` sampled solutions per problem, grouped by problem.
For each N, only the first N candidates of every problem count: the PRM picks the one it
scores highest, majority vote the one whose final answer the most candidates share (ties:
the earliest candidate), and random choice scores the mean correctness of the N (its expected
accuracy). Comparing the three at several N says whether the PRM's ranking beats the ones that
need no model at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["selection_accuracy"]


def selection_accuracy(
    scores: Tensor, outcome: Tensor, answer: Tensor, candidates: int, n_values: Iterable[int]
) -> dict[str, float]:
    """``{prm@N, majority@N, random@N}`` for each N in ``n_values`` up to ``candidates``.

    Args:
        scores: ``[P * C]`` the PRM's score of each solution (higher: more likely correct).
        outcome: ``[P * C]`` 1.0 where the solution's final answer is right, else 0.0.
        answer: ``[P * C]`` the solution's final answer (any comparable values, e.g. ints).
        candidates: C, the solutions per problem; rows are grouped by problem.
        n_values: the N to report; those above C are left out.
    """
    outcome = outcome.float().view(-1, candidates)
    answer = answer.view(-1, candidates)
    scores = scores.view(-1, candidates)
    out: dict[str, float] = {}
    for n in n_values:
        if n > candidates:
            continue
        pick = scores[:, :n].argmax(1, keepdim=True)
        out[f"prm@{n}"] = outcome[:, :n].gather(1, pick).mean().item()
        votes = (answer[:, :n, None] == answer[:, None, :n]).sum(2)  # [P, n]: each one's answer
        first = votes.argmax(1, keepdim=True)  # argmax takes the first maximum: the earliest
        out[f"majority@{n}"] = outcome[:, :n].gather(1, first).mean().item()
        out[f"random@{n}"] = outcome[:, :n].mean().item()
    return out
