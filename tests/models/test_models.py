"""The bundled models refuse sizes that would build a model that cannot learn, and inputs of
another shape than the one they read."""

import pytest
import torch

from bilevel.models import MLP
from bilevel.models.step_scorer import StepScorer
from bilevel.models.tiny_gpt import TinyGPT


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: MLP(4, 2, hidden=0), "hidden"),
        (lambda: MLP(4, 2, hidden=[8, 0]), "hidden[1]"),
        (lambda: MLP(0, 2), "in_dim"),
        (lambda: MLP(4, 2, hidden=2.5), "hidden"),
        (lambda: TinyGPT(16, 8, heads=0), "heads"),
        (lambda: TinyGPT(16, 8, d_model=0), "d_model"),
        (lambda: TinyGPT(16, 8, layers=-1), "layers"),
        (lambda: TinyGPT(16, 8, d_model=30, heads=4), "d_model"),
    ],
)
def test_bad_sizes_are_refused_by_name(build, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_good_sizes_build():
    assert MLP(4, 2, hidden=[8, 3])(__import__("torch").zeros(5, 4)).shape == (5, 2)
    TinyGPT(16, 8, layers=0)  # a bigram model: no blocks is allowed


def test_tiny_gpt_is_causal_and_its_size_does_not_grow_with_max_len_squared():
    torch.manual_seed(0)
    model = TinyGPT(16, 4096, d_model=8, heads=2, layers=1)
    # parameters and buffers: no max_len x max_len table (16M floats here)
    assert sum(t.numel() for t in [*model.parameters(), *model.buffers()]) < 100_000
    x = torch.randint(0, 16, (2, 6))
    changed = x.clone()
    changed[:, 4:] = (x[:, 4:] + 1) % 16
    # logits at positions 0..3 do not see tokens 4 and 5
    torch.testing.assert_close(model(x)[:, :4], model(changed)[:, :4])
    assert not torch.allclose(model(x)[:, 4:], model(changed)[:, 4:])


@pytest.mark.parametrize(
    "model,x,match",
    [
        (MLP(4, 2), torch.zeros(5, 3), r"MLP reads x \[B, 4\]"),
        (MLP(4, 2), torch.zeros(5), r"MLP reads x \[B, 4\]"),
        (StepScorer(4), torch.zeros(5, 4), r"step features \[B, S, 4\], got \(5, 4\)"),
        (StepScorer(4), torch.zeros(5, 3, 2), r"step features \[B, S, 4\]"),
    ],
)
def test_inputs_of_another_shape_are_refused_by_name(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x)
    MLP(4, 2)(torch.zeros(5, 2, 2))  # rows are flattened: a 2x2 image has 4 features
