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
