import pytest
import torch

from bilevel import DomainWeights
from bilevel.outer import MirrorDescent


@pytest.mark.parametrize(
    "param,default",
    [("softmax", 0.25), ("exp", 1.0), ("sigmoid", 0.5), ("softplus", 1.0)],
)
def test_default_values_are_uniform(param, default):
    w = DomainWeights(["a", "b", "c", "d"], parametrization=param)
    assert w.logits.shape == (4,)
    assert isinstance(w.logits, torch.nn.Parameter)
    torch.testing.assert_close(w.value(), torch.full((4,), default))


@pytest.mark.parametrize("param", ["softmax", "exp", "sigmoid", "softplus"])
def test_init_gives_values_not_logits(param):
    init = [0.1, 0.2, 0.3, 0.4]
    w = DomainWeights(list("abcd"), parametrization=param, init=init, dtype=torch.float64)
    expected = torch.tensor(init, dtype=torch.float64)
    if param == "softplus":  # normalised to mean 1
        expected = expected / expected.mean()
    torch.testing.assert_close(w.value(), expected)


def test_softmax_init_is_normalised():
    w = DomainWeights(["a", "b"], init=[1.0, 3.0])
    torch.testing.assert_close(w.value(), torch.tensor([0.25, 0.75]))


def test_value_is_differentiable_in_logits():
    w = DomainWeights(["a", "b", "c"], parametrization="exp", dtype=torch.float64)
    (w.value() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(w.logits.grad, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_dtype_and_names():
    w = DomainWeights(["x", "y"], dtype=torch.float64)
    assert w.logits.dtype == torch.float64 and w.names == ["x", "y"]
    assert w.parametrization == "softmax"
    assert set(w.as_dict()) == {"x", "y"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init": [0.5, -0.5]}, "> 0"),
        ({"init": [0.0, 1.0]}, "> 0"),
        ({"init": [1.0, 1.0], "parametrization": "exp", "names": ["a"]}, "2 values"),
        ({"init": [0.5, 0.2, 0.3]}, "3 values but there are 2"),
        ({"names": ["a", "a"]}, "duplicate"),
        ({"parametrization": "relu"}, "softmax"),
        ({"init": [0.5, 1.5], "parametrization": "sigmoid"}, r"\(0, 1\)"),
        ({"init": [float("nan"), 1.0]}, "finite"),
        ({"names": []}, "at least one"),
    ],
)
def test_bad_input(kwargs, match):
    kwargs.setdefault("names", ["a", "b"])
    with pytest.raises(ValueError, match=match):
        DomainWeights(**kwargs)


def test_a_string_of_names_is_refused():
    from bilevel.weights.meta_weight_net import MetaWeightNet

    for outer_variables in (DomainWeights, MetaWeightNet):
        with pytest.raises(TypeError, match="the string 'abc'"):  # not three domains a, b, c
            outer_variables("abc")


def test_set_values_round_trip():
    w = DomainWeights(list("abc"), parametrization="sigmoid", dtype=torch.float64)
    w.set_values([0.2, 0.7, 0.9])
    torch.testing.assert_close(w.value(), torch.tensor([0.2, 0.7, 0.9], dtype=torch.float64))


def test_mirror_descent_is_exponentiated_gradient():
    w = DomainWeights(list("abc"), init=[0.2, 0.3, 0.5], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = MirrorDescent([w.logits], lr=0.3)
    w.logits.grad = g.clone()
    opt.step()
    expected = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64) * torch.exp(-0.3 * g)
    torch.testing.assert_close(w.value(), expected / expected.sum())


def test_mirror_descent_smoothing_and_skip():
    w = DomainWeights(list("ab"), init=[0.5, 0.5], dtype=torch.float64)
    opt = MirrorDescent([w.logits], lr=1.0, smoothing=0.1)
    w.logits.grad = torch.tensor([0.0, 100.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.value(), torch.tensor([0.95, 0.05], dtype=torch.float64))
    before = w.logits.detach().clone()
    opt.found_inf = torch.ones(())
    w.logits.grad = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(w.logits.detach(), before)


@pytest.mark.parametrize("param", ["softmax", "exp", "sigmoid", "softplus"])
def test_parametrization_vjp_matches_autograd(param):
    from bilevel.weights import apply_parametrization, parametrization_vjp

    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, dtype=torch.float64)
    (expected,) = torch.autograd.grad(apply_parametrization(param, logits), logits, g)
    torch.testing.assert_close(parametrization_vjp(param, logits, g), expected)


def test_dreamprm_mse_losses():
    from bilevel.losses import aggregation_loss, step_mse

    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    batch = {
        "step_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        "step_labels": torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        "outcome": torch.tensor([1.0, 0.0]),
    }
    p = torch.sigmoid(logits)
    expected = torch.stack(
        [((p[0, :2] - batch["step_labels"][0, :2]) ** 2).mean(), (p[1] ** 2).mean()]
    )
    torch.testing.assert_close(step_mse(logits, batch), expected)
    score = torch.sigmoid(torch.tensor([1.0, 1 / 3]))  # sigmoid of the mean step log-odds
    torch.testing.assert_close(
        aggregation_loss(logits, batch, loss="mse"), ((score - batch["outcome"]) ** 2).mean()
    )


def test_init_by_name_in_any_order_and_every_name_needed():
    w = DomainWeights(["a", "b", "c"], init={"c": 0.6, "a": 0.2, "b": 0.2})
    torch.testing.assert_close(w.value(), torch.tensor([0.2, 0.2, 0.6]))
    w.set_values({"a": 0.5, "b": 0.25, "c": 0.25})
    torch.testing.assert_close(w.value(), torch.tensor([0.5, 0.25, 0.25]))
    with pytest.raises(ValueError, match=r"init gives no value for \['c'\]"):
        DomainWeights(["a", "b", "c"], init={"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match=r"init names no domain \['x'\]: the domains are"):
        DomainWeights(["a", "b", "c"], init={"a": 1, "b": 1, "c": 1, "x": 1})
