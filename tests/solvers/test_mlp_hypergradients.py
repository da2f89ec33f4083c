"""Hypergradients on a small MLP: against `higher`, against a dense Hessian, and flat in K."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.functional import trainable_params
from bilevel.solvers import build

higher = pytest.importorskip("higher")


def per_example_ce(output, batch):
    return F.cross_entropy(output, batch["y"], reduction="none")


def mean_ce(output, batch):
    return F.cross_entropy(output, batch["y"])


def make_problem(k=3, n=12, d=5, hidden=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    batch = {
        "x": torch.randn(k * n, d, generator=g, dtype=torch.float64),
        "y": torch.randint(0, classes, (k * n,), generator=g),
        "domain": torch.arange(k).repeat_interleave(n),
    }
    meta = {
        "x": torch.randn(20, d, generator=g, dtype=torch.float64),
        "y": torch.randint(0, classes, (20,), generator=g),
    }
    weights = DomainWeights(
        [f"d{i}" for i in range(k)], init=torch.rand(k, generator=g) + 0.2, dtype=torch.float64
    )
    return model, batch, meta, weights


def test_per_domain_loss_is_segment_mean():
    model, batch, _, w = make_problem()
    per_domain = make_per_domain_loss(model, batch, per_example_ce, len(w))
    got = per_domain(trainable_params(model))
    losses = per_example_ce(model(batch["x"]), batch)
    expected = torch.stack([losses[batch["domain"] == i].mean() for i in range(len(w))])
    torch.testing.assert_close(got, expected)


def test_segment_mean_empty_domain_is_zero():
    values = torch.tensor([1.0, 3.0, 5.0])
    out = bilevel.segment_mean(values, torch.tensor([0, 0, 2]), 4)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, 5.0, 0.0]))


@pytest.mark.parametrize("param", ["softmax", "exp"])
def test_unrolled_matches_higher_on_mlp(param):
    model, batch, meta, _ = make_problem()
    k = 3
    w = DomainWeights(
        ["a", "b", "c"],
        parametrization=param,
        init=[0.5, 0.2, 0.3] if param == "softmax" else [1.0, 0.4, 2.0],
        dtype=torch.float64,
    )
    steps, lr = 4, 0.3
    # Reference: higher's patched module and differentiable SGD, gradients through the logits.
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        wv = w.value()
        for _ in range(steps):
            losses = per_example_ce(fmodel(batch["x"]), batch)
            per_domain = torch.stack([losses[batch["domain"] == i].mean() for i in range(k)])
            diffopt.step((wv * per_domain).sum())
        reference = torch.autograd.grad(mean_ce(fmodel(meta["x"]), meta), w.logits)[0]
    got = bilevel.hypergradient(
        build("unrolled", steps=steps),
        make_per_domain_loss(model, batch, per_example_ce, k),
        make_outer_loss(model, meta, mean_ce),
        trainable_params(model),
        w,
        inner_lr=lr,
    )
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-10)


def _dense_implicit(model, batch, meta, w, damping):
    """-J_L (H + damping I)^-1 grad M with a materialized Hessian (test reference only)."""
    params = trainable_params(model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].flatten() for n in names])
    per_domain = make_per_domain_loss(model, batch, per_example_ce, len(w))
    outer = make_outer_loss(model, meta, mean_ce)

    def unflat(flat):
        return {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}

    wv = w.value().detach()
    hess = torch.autograd.functional.hessian(lambda f: wv @ per_domain(unflat(f)), flat0)
    jac = torch.autograd.functional.jacobian(lambda f: per_domain(unflat(f)), flat0)  # [K, P]
    g = torch.autograd.functional.jacobian(lambda f: outer(unflat(f)), flat0)
    v = torch.linalg.solve(hess + damping * torch.eye(len(flat0), dtype=flat0.dtype), g)
    return -jac @ v, torch.linalg.eigvalsh(
        hess + damping * torch.eye(len(flat0), dtype=flat0.dtype)
    )


def test_cg_matches_dense_hessian_on_mlp():
    model, batch, meta, w = make_problem()
    damping = 0.5  # makes the (possibly indefinite) MLP Hessian positive definite
    truth, eig = _dense_implicit(model, batch, meta, w, damping)
    assert eig.min() > 0
    args = (
        make_per_domain_loss(model, batch, per_example_ce, len(w)),
        make_outer_loss(model, meta, mean_ce),
        trainable_params(model),
        w,
    )
    n_params = sum(p.numel() for p in model.parameters())
    cg = bilevel.hypergradient(
        build("cg", iters=3 * n_params, damping=damping), *args, wrt="values"
    )
    torch.testing.assert_close(cg, truth, rtol=1e-6, atol=1e-9)


def _count_calls(name, k):
    model, batch, meta, _ = make_problem(k=k, n=4)
    w = DomainWeights([f"d{i}" for i in range(k)], dtype=torch.float64)
    calls = {"forward": 0, "autograd": 0}

    def count_forward(*_):
        calls["forward"] += 1

    original = torch.autograd.grad

    def counting_grad(*a, **kw):
        calls["autograd"] += 1
        return original(*a, **kw)

    hook = model.register_forward_hook(count_forward)
    with mock.patch.object(torch.autograd, "grad", counting_grad):
        bilevel.hypergradient(
            build(name),
            make_per_domain_loss(model, batch, per_example_ce, k),
            make_outer_loss(model, meta, mean_ce),
            trainable_params(model),
            w,
        )
    hook.remove()
    return calls


@pytest.mark.parametrize("name", ["first_order", "unrolled", "neumann", "cg"])
def test_cost_is_flat_in_k(name):
    """The number of forward passes and autograd calls does not depend on K."""
    assert _count_calls(name, 2) == _count_calls(name, 16)


class _SquareNoJvp(torch.autograd.Function):
    """x**2 with a backward formula but no forward-mode one."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return _SquareNoJvp.apply(self.lin(x))


def test_first_order_falls_back_when_forward_mode_is_missing():
    _, batch, meta, w = make_problem()
    model = _SquareNet()
    per_domain = make_per_domain_loss(model, batch, per_example_ce, len(w))
    outer = make_outer_loss(model, meta, mean_ce)
    params = trainable_params(model)
    got = bilevel.hypergradient(
        build("first_order"), per_domain, outer, params, w, 0.2, wrt="values"
    )
    names = list(params)
    leaves = [params[n].clone().requires_grad_(True) for n in names]
    g_meta = torch.autograd.grad(outer(dict(zip(names, leaves))), leaves)
    expected = []
    for k in range(len(w)):
        g_k = torch.autograd.grad(per_domain(dict(zip(names, leaves)))[k], leaves)
        expected.append(-0.2 * sum((a * b).sum() for a, b in zip(g_k, g_meta)))
    torch.testing.assert_close(got, torch.stack(expected))


def test_functional_calls_follow_a_replaced_submodule():
    model, batch, _, w = make_problem()
    per_domain = make_per_domain_loss(model, batch, per_example_ce, len(w))
    per_domain(trainable_params(model))  # builds the cached name slots
    model[2] = nn.Linear(7, 3).double()  # replace the head after the first call
    params = trainable_params(model)
    params["2.weight"] = params["2.weight"] * 2
    expected = torch.func.functional_call(model, params, (batch["x"],))
    losses = per_example_ce(expected, batch)
    want = torch.stack([losses[batch["domain"] == i].mean() for i in range(len(w))])
    torch.testing.assert_close(per_domain(params), want)
    assert torch.equal(model[2].weight, trainable_params(model)["2.weight"])  # restored


class _SharedModule(nn.Module):
    """An MLP registered under two names (as T5 and BART register their shared embedding)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.alias = self.body

    def forward(self, x):
        return self.body(x)


class _SharedParameter(nn.Module):
    """One weight used by two layers (as a tied input embedding and output head)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.head = nn.Linear(5, 5)
        self.head.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.tanh(self.first(x)))[:, :3]


class _Untied(nn.Module):
    """_SharedParameter with its one weight held once, used twice by hand: the reference."""

    def __init__(self, tied):
        super().__init__()
        self.w = nn.Parameter(tied.first.weight.detach().clone())
        self.b1 = nn.Parameter(tied.first.bias.detach().clone())
        self.b2 = nn.Parameter(tied.head.bias.detach().clone())

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w, self.b1)), self.w, self.b2)[:, :3]


@pytest.mark.parametrize("tying", ["module", "parameter"])
def test_tied_weights_keep_the_model_intact_and_the_hypergradient_exact(tying):
    # torch.func.functional_call (2.13) leaves plain tensors in place of the parameters of a
    # module registered twice (pytorch/pytorch#164759): the inner optimizer then steps
    # parameters the model no longer uses, and the hypergradient of the next call is zero.
    _, batch, meta, w = make_problem()
    torch.manual_seed(1)
    if tying == "module":
        tied = _SharedModule().double()
        reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        reference.load_state_dict(tied.body.state_dict())
    else:
        tied = _SharedParameter().double()
        reference = _Untied(tied)
    before = dict(tied.named_parameters(remove_duplicate=False))
    for solver in (build("cg", iters=4), build("unrolled", steps=2), build("cg", iters=4)):
        got, want = (
            bilevel.hypergradient(
                solver,
                make_per_domain_loss(model, batch, per_example_ce, len(w)),
                make_outer_loss(model, meta, mean_ce),
                trainable_params(model),
                w,
                inner_lr=0.3,
            )
            for model in (tied, reference)
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got.abs().max() > 1e-4
    after = dict(tied.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)  # the same Parameter objects


def test_two_names_of_one_tied_weight_with_different_tensors_are_refused():
    _, batch, _, w = make_problem()
    model = _SharedParameter().double()
    per_domain = make_per_domain_loss(model, batch, per_example_ce, len(w))
    params = trainable_params(model)
    same = dict(params, **{"head.weight": params["first.weight"]})
    torch.testing.assert_close(per_domain(same), per_domain(params))
    with pytest.raises(ValueError, match="'first.weight' and 'head.weight'.*tied"):
        per_domain(dict(params, **{"head.weight": params["first.weight"] * 2}))
