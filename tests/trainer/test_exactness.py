"""The trainer's hypergradient is exactly the derivative through the last inner step; weight decay
is damping of the implicit solve."""

import functools

import pytest
import torch
import torch.nn.functional as F

from bilevel import BilevelTrainer, DomainWeights, TrainerConfig
from bilevel.data import noisy_domains
from bilevel.hypergradient import chain_through_parametrization
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build


def captured_outer_grad(solver, inner_optimizer=None, config=None, **opts):
    """The gradient the trainer hands its outer optimizer after one window of one inner step,
    and what it needs to check it: theta before the step, the batch, the meta set. Everything
    is float64, so the comparison is tight."""
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].double()
    model = MLP(**data.model_kwargs, hidden=16).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names, init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64),
        build(solver, **opts),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(
            **{"steps": 1, "outer_every": 1, "batch_size": 32, "progress": False} | (config or {})
        ),
        inner_optimizer=inner_optimizer,
    )
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = trainer.train_sampler.state_dict()
    batch = trainer.loop.next_batch()
    trainer.train_sampler.load_state_dict(state)
    captured = {}
    original = trainer._apply

    def capture(update):
        captured["grad"] = chain_through_parametrization(trainer.weights, update.grad)
        original(update)

    trainer._apply = capture
    trainer.step_window()
    return captured["grad"], theta0, batch, trainer


def two_groups(params):
    """SGD whose first layer steps at 0.3 and the rest at 0.1 (a head/body split)."""
    params = list(params)
    return torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:]}], lr=0.1)


@pytest.mark.parametrize("groups", [False, True], ids=["one lr", "two groups"])
@pytest.mark.parametrize("solver,opts", [("first_order", {}), ("unrolled", {"steps": 1})])
def test_trainer_hypergradient_is_exact_through_the_last_step(solver, opts, groups):
    # with parameter groups, each tensor steps at its own group's lr: the derivative through
    # that step (first_order took the first group's lr for every tensor, and unrolled stepped
    # every tensor at it, off the optimizer's trajectory)
    optimizer = two_groups if groups else None
    grad, theta0, batch, trainer = captured_outer_grad(solver, optimizer, **opts)
    model, k = trainer.module, 4
    lrs = [0.3, 0.3, 0.1, 0.1] if groups else [0.1] * 4
    names = list(theta0)
    leaves = [theta0[n].clone().requires_grad_(True) for n in names]
    logits = trainer.weights.logits.detach().clone()
    # the weights before the outer step: recompute from the initial values
    logits = (
        DomainWeights(trainer.names, init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
        .logits.detach()
        .clone()
        .requires_grad_(True)
    )
    w = torch.softmax(logits, 0)

    def per_domain(params):
        out = torch.func.functional_call(model, dict(zip(names, params)), (batch["x"],))
        losses = F.cross_entropy(out, batch["y"], reduction="none")
        return torch.stack([losses[batch["domain"] == i].mean() for i in range(k)])

    g = torch.autograd.grad((w * per_domain(leaves)).sum(), leaves, create_graph=True)
    theta1 = [p - lr * gi for p, gi, lr in zip(leaves, g, lrs, strict=True)]
    meta = trainer.meta_sampler.columns
    out = torch.func.functional_call(model, dict(zip(names, theta1)), (meta["x"],))
    expected = torch.autograd.grad(F.cross_entropy(out, meta["y"]), logits)[0]
    # float64 throughout: agreement to rounding, while reading theta_T instead of theta_{T-1}
    # in the kept graph would differ at the level of lr * grad
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "opts,config",
    [
        ({}, {}),  # the last inner step's graph
        ({"products": "finite_difference"}, {}),  # the module itself
        ({}, {"sampling": "weights"}),  # the public API on a uniform batch
        ({}, {"hessian_batch": "independent"}),
    ],
    ids=["graph", "module", "api", "independent"],
)
def test_the_inner_optimizers_weight_decay_is_damping_of_the_implicit_solve(
    opts, config, monkeypatch
):
    """SGD's weight_decay lambda makes the inner objective L_w + lambda/2 |theta|^2: every path
    of the trainer solves with H + lambda I, as cg with damping=lambda on the loss alone does."""
    import bilevel.methods.hypergradient as method

    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.5)
    with_decay, *_ = captured_outer_grad("cg", sgd, config, iters=3, **opts)
    monkeypatch.setattr(method, "l2_decay", lambda *args: None)
    as_damping, *_ = captured_outer_grad("cg", sgd, config, iters=3, damping=0.5, **opts)
    ignored, *_ = captured_outer_grad("cg", sgd, config, iters=3, **opts)
    torch.testing.assert_close(with_decay, as_damping, rtol=1e-9, atol=1e-13)
    assert (with_decay - ignored).norm() > 0.01 * ignored.norm()
