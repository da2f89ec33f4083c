"""What an evaluator may answer: a dict of numbers (one-element tensors and numpy scalars read as
numbers), anything else one line naming data.evaluate."""

import json

import numpy as np
import pytest
import torch

from bilevel.data.evaluate import checked_metrics
from bilevel.errors import ConfigError


def test_numbers_tensors_and_numpy_scalars_become_floats():
    metrics = checked_metrics(
        {"acc": torch.tensor(0.5), "n": 3, "f1": np.float32(0.25), "ok": True, "loss": [1.5][0]}
    )
    assert metrics == {"acc": 0.5, "n": 3.0, "f1": 0.25, "ok": 1.0, "loss": 1.5}
    assert all(type(v) is float for v in metrics.values())
    json.dumps(metrics)  # what the summary write needs


@pytest.mark.parametrize(
    "answer,match",
    [
        ([0.5, 0.7], "must return a dict .* got list"),
        (0.5, "must return a dict .* got float"),
        ({"acc": "high"}, "metric 'acc' must be a number .* got str"),
        ({"acc": torch.ones(3)}, "metric 'acc' must be a number .* got Tensor"),
        ({"per_domain": {"a": 1.0}}, "metric 'per_domain' must be a number .* got dict"),
    ],
)
def test_other_answers_are_one_line_naming_data_evaluate(answer, match):
    with pytest.raises(ConfigError, match=f"data.evaluate: {match}"):
        checked_metrics(answer)


def test_best_of_n_majority_breaks_ties_by_the_earliest_candidate():
    """Two problems of 4 candidates. Problem 0: answers 7, 3, 3, 7 (a 2-2 tie): majority vote
    takes the earliest candidate's answer 7 (a vote over answer values had taken 3, the
    smaller one); problem 1: answers 5, 5, 2, 1, majority 5."""
    from bilevel.data.best_of_n import selection_accuracy

    answer = torch.tensor([7, 3, 3, 7, 5, 5, 2, 1])
    outcome = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 0])
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0, 0.1, 0.8, 0.7])
    got = selection_accuracy(scores, outcome, answer, candidates=4, n_values=(1, 2, 4, 8))
    assert set(got) == {f"{k}@{n}" for k in ("prm", "majority", "random") for n in (1, 2, 4)}
    assert got["majority@4"] == 0.5  # problem 0 right (7), problem 1 wrong (5)
    assert got["majority@2"] == 0.5  # answers 7, 3 and 5, 5: the earliest, then 5
    assert got["prm@4"] == 0.5  # scores pick candidate 1 (wrong) and 2 (right)
    assert got["prm@1"] == 0.5 and got["random@4"] == 3 / 8
