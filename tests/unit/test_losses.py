"""The library's losses read one output shape each and refuse another: several of the wrong
shapes broadcast into a number instead of failing (step scores [B, S, 1] against step labels
[B, S]; next-token logits [B, T, V] with T == V read by cross_entropy as T classes)."""

import pytest
import torch

from bilevel import losses


def _step_batch(b=3, s=4):
    return {
        "step_mask": torch.ones(b, s),
        "step_labels": torch.rand(b, s),
        "outcome": torch.tensor([1.0, 0.0, 1.0])[:b],
        "problem": torch.tensor([0, 0, 1])[:b],
    }


@pytest.mark.parametrize(
    "loss",
    [
        losses.step_mse,
        losses.step_bce,
        losses.aggregation_loss,
        losses.pairwise_ranking_loss,
    ],
)
def test_step_losses_read_step_logits_and_refuse_a_trailing_dimension(loss):
    batch = _step_batch()
    value = loss(torch.randn(3, 4), batch)
    assert torch.isfinite(value).all()
    with pytest.raises(ValueError, match=r"reads step logits \[B, S\].*\(3, 4, 1\)"):
        loss(torch.randn(3, 4, 1), batch)  # broadcast to [3, 4, 4] before
    with pytest.raises(ValueError, match="'step_mask'"):
        loss(torch.randn(3, 5), batch)  # more scores than steps


def test_aggregation_losses_read_one_outcome_per_solution():
    batch = {**_step_batch(), "outcome": torch.ones(3, 1)}
    for loss in (losses.aggregation_loss, losses.pairwise_ranking_loss):
        with pytest.raises(ValueError, match=r"'outcome' as one value per solution \[B\]"):
            loss(torch.randn(3, 4), batch)


def test_class_and_token_losses_refuse_each_others_outputs():
    tokens = {"y": torch.randint(0, 8, (2, 8))}
    logits = torch.randn(2, 8, 8)  # T == V: F.cross_entropy took it as 8 classes, silently
    for loss in (losses.cross_entropy, losses.per_example_cross_entropy):
        with pytest.raises(ValueError, match=r"class logits \[B, C\].*token_cross_entropy"):
            loss(logits, tokens)
    for loss in (losses.token_cross_entropy, losses.per_sequence_token_cross_entropy):
        assert torch.isfinite(loss(logits, tokens)).all()
        with pytest.raises(ValueError, match=r"next-token logits \[B, T, V\]"):
            loss(torch.randn(2, 8), {"y": torch.randint(0, 8, (2,))})
        with pytest.raises(ValueError, match=r"'y' as target token ids"):
            loss(logits, {"y": torch.randint(0, 8, (2, 7))})
    # soft targets for class logits stay allowed
    soft = torch.softmax(torch.randn(2, 3), -1)
    assert losses.cross_entropy(torch.randn(2, 3), {"y": soft}).dim() == 0
