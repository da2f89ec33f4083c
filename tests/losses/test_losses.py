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


def test_the_library_losses_read_logits_from_a_dict_a_model_output_or_a_tuple():
    # a Hugging Face model returns a ModelOutput: the shipped losses failed on it with a
    # shape error although its logits were what they read
    from collections import namedtuple

    from bilevel.losses import cross_entropy, per_example_cross_entropy
    from bilevel.losses.lm import token_cross_entropy
    from bilevel.losses.prm import pairwise_ranking_loss, step_mse

    Output = namedtuple("Output", ["logits", "hidden"])  # attribute access, like ModelOutput
    logits, batch = torch.randn(4, 3), {"y": torch.tensor([0, 1, 2, 0])}
    for wrapped in ({"logits": logits}, (logits, None), Output(logits, None)):
        assert torch.equal(cross_entropy(wrapped, batch), cross_entropy(logits, batch))
        assert torch.equal(
            per_example_cross_entropy(wrapped, batch), per_example_cross_entropy(logits, batch)
        )
    tokens = {"y": torch.randint(0, 5, (2, 3))}
    lm = torch.randn(2, 3, 5)
    assert torch.equal(token_cross_entropy({"logits": lm}, tokens), token_cross_entropy(lm, tokens))
    steps = torch.randn(4, 5)
    prm = {
        "step_mask": torch.ones(4, 5),
        "step_labels": torch.rand(4, 5),
        "outcome": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "problem": torch.tensor([0, 0, 1, 1]),
    }
    assert torch.equal(step_mse({"logits": steps}, prm), step_mse(steps, prm))
    assert torch.equal(pairwise_ranking_loss((steps,), prm), pairwise_ranking_loss(steps, prm))
    with pytest.raises(ValueError, match="cross_entropy reads class logits .* got output dict"):
        cross_entropy({"scores": logits}, batch)
