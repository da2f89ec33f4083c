"""Each method's update on a case with a known answer: SAMA, ScaleBiO, MW-Net, ODM, loss-based
reweighting, DoGE."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import BilevelTrainer, DomainWeights, MirrorDescent, TrainerConfig
from bilevel.data import noisy_domains
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.methods.loss_reweighting import loss_factors
from bilevel.models import MLP
from bilevel.solvers import build
from bilevel.solvers.sama import optimizer_preconditioner
from bilevel.weights.meta_weight_net import MetaWeightNet
from tests.solvers.test_products import mlp_problem


def test_sama_with_sgd_equals_first_order():
    model, per_domain, outer, weights = mlp_problem()
    params = bilevel.functional.trainable_params(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)
    sama = bilevel.hypergradient(
        build("sama"), per_domain, outer, params, weights, inner_lr=99.0, optimizer=sgd
    )
    first = bilevel.hypergradient(build("first_order"), per_domain, outer, params, weights, 0.3)
    torch.testing.assert_close(sama, first)  # P = lr I: the optimizer's lr, not inner_lr


def test_sama_refuses_an_optimizer_it_cannot_use_instead_of_ignoring_it():
    """Adam without the gradients of its last step, before its first step, or over other
    tensors fell back to inner_lr * I without a word (or failed with an IndexError)."""
    model, per_domain, outer, weights = mlp_problem()
    params = bilevel.functional.trainable_params(model)

    def call(optimizer, last_grads=None):
        return bilevel.hypergradient(
            "sama",
            per_domain,
            outer,
            params,
            weights,
            0.1,
            optimizer=optimizer,
            last_grads=last_grads,
        )

    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="has not taken a step"):
        call(adam, grads)
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    adam.step()
    with pytest.raises(ValueError, match="last_grads: sama with Adam needs the gradients"):
        call(adam)
    with pytest.raises(ValueError, match="last_grads: .* got 1"):
        call(adam, grads[:1])
    with pytest.raises(ValueError, match="optimizer: its 1 parameter"):
        call(torch.optim.SGD([next(model.parameters())], lr=0.1))
    with pytest.warns(UserWarning, match="not of this RMSprop: it uses inner_lr"):
        call(torch.optim.RMSprop(model.parameters(), lr=0.1))
    assert torch.isfinite(call(adam, grads)).all()


def test_sama_without_an_optimizer_is_first_order():
    model, per_domain, outer, weights = mlp_problem()
    params = bilevel.functional.trainable_params(model)
    torch.testing.assert_close(
        bilevel.hypergradient(build("sama"), per_domain, outer, params, weights, 0.2),
        bilevel.hypergradient(build("first_order"), per_domain, outer, params, weights, 0.2),
    )


@pytest.mark.parametrize(
    "cls,wd", [(torch.optim.Adam, 0.0), (torch.optim.Adam, 0.1), (torch.optim.AdamW, 0.1)]
)
def test_sama_adam_preconditioner_is_the_update_jacobian(cls, wd):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = cls([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(3)]
    for g in grads[:-1]:
        p.grad = g.clone()
        opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    theta = p.detach().clone()
    p.grad = grads[-1].clone()
    opt.step()
    pre = optimizer_preconditioner(opt, [p], [grads[-1]])[0]

    def update(g):  # Adam(W)'s step as a function of the last gradient
        beta1, beta2, eps, lr = 0.8, 0.95, 1e-6, 0.01
        t = float(state["step"]) + 1
        if cls is torch.optim.Adam:
            g = g + wd * theta
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        step = lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        return -step

    g = grads[-1].clone().requires_grad_(True)
    # elementwise: d(sum of -update)/dg is the diagonal of -d(update)/dg
    expected = torch.autograd.grad(-update(g).sum(), g)[0]
    torch.testing.assert_close(pre, expected)


def test_scalebio_weight_gradient_is_the_penalty_gradient():
    # on a quadratic: after one window of one step, the weights' gradient is
    # d/dw alpha [F_w(theta) - F_w(u)] at the batch's per-domain losses
    torch.manual_seed(0)
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)
    model = nn.Linear(16, 4)

    def quad(out, batch):  # a quadratic per-example loss
        return ((out - F.one_hot(batch["y"], 4).float()) ** 2).sum(1)

    solver = build("scalebio", alpha=2.5)
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        solver,
        quad,
        cross_entropy,
        data,
        TrainerConfig(steps=1, outer_every=1, batch_size=16, progress=False),
    )
    loop = trainer.loop
    u0 = [t.detach().clone() for t in solver._state["u"]]
    theta0 = [p.detach().clone() for p in loop.params]
    state = loop.train_sampler.state_dict()
    batch = loop.next_batch()
    loop.train_sampler.load_state_dict(state)
    update = solver.window(loop, 1, True)
    w = loop.w.clone().requires_grad_(True)
    names = loop.param_names
    f = lambda ps: loop.per_domain_loss(batch)(dict(zip(names, ps)))  # noqa: E731
    penalty = 2.5 * (torch.dot(w, f(theta0)) - torch.dot(w, f(u0)))
    torch.testing.assert_close(update.grad, torch.autograd.grad(penalty, w)[0])


def test_scalebio_copy_is_only_of_the_trainable_parameters():
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)
    model = MLP(**data.model_kwargs, hidden=8)
    model.net[0].requires_grad_(False)
    solver = build("scalebio")
    BilevelTrainer(
        model,
        DomainWeights(data.names),
        solver,
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=5, progress=False),
    )
    shapes = [tuple(t.shape) for t in solver._state["u"]]
    assert shapes == [tuple(p.shape) for p in model.net[2].parameters()]


def test_scalebio_copy_steps_with_the_inner_optimizers_groups_and_schedule():
    # the copy u had one group built from the optimizer's defaults: a group's own lr and the
    # inner schedule never reached it, so u descended at another rate than theta
    torch.manual_seed(0)
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)
    model = MLP(**data.model_kwargs, hidden=8)

    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:]}], lr=0.05)

    solver = build("scalebio")
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        solver,
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=3, outer_every=3, batch_size=16, progress=False),
        inner_optimizer=two_groups,
        inner_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
    )
    loop = trainer.loop
    u_opt = solver._state["u_opt"]
    assert [len(g["params"]) for g in u_opt.param_groups] == [2, 2]
    u0 = [t.detach().clone() for t in solver._state["u"]]
    state = loop.train_sampler.state_dict()
    batch = loop.next_batch()
    loop.train_sampler.load_state_dict(state)
    names = loop.param_names
    losses = loop.per_domain_loss(batch)(dict(zip(names, [t.requires_grad_() for t in u0])))
    grads = torch.autograd.grad(torch.dot(loop.w, losses), u0)
    solver.window(loop, 1, False)  # one step at the groups' first learning rates
    for t, t0, g, lr in zip(solver._state["u"], u0, grads, [0.3, 0.3, 0.05, 0.05]):
        torch.testing.assert_close(t, t0 - lr * g)
    solver.window(loop, 2, True)  # the third step halved twice by the schedule
    assert [g["lr"] for g in u_opt.param_groups] == [0.3 * 0.25, 0.05 * 0.25]


def test_meta_weight_net_hypergradient_through_one_explicit_step():
    torch.manual_seed(0)
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].double()
    model = MLP(**data.model_kwargs, hidden=8).double()
    net = MetaWeightNet(data.names, hidden=5, dtype=torch.float64)
    trainer = BilevelTrainer(
        model,
        net,
        build("first_order"),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=1, outer_every=1, batch_size=16, progress=False),
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.3),
    )
    loop = trainer.loop
    theta0 = {n: p.detach().clone() for n, p in zip(loop.param_names, loop.params)}
    phi = net.logits.detach().clone().requires_grad_(True)
    state = loop.train_sampler.state_dict()
    batch = loop.next_batch()
    loop.train_sampler.load_state_dict(state)
    update = trainer.method.window(loop, 1, True)
    assert update.wrt_logits

    names = list(theta0)
    leaves = [theta0[n].clone().requires_grad_(True) for n in names]
    out = torch.func.functional_call(model, dict(zip(names, leaves)), (batch["x"],))
    losses = F.cross_entropy(out, batch["y"], reduction="none")
    c = net.coefficients(losses, batch["domain"], flat=phi)
    g = torch.autograd.grad((c * losses).mean(), leaves, create_graph=True)
    theta1 = [t - 0.3 * gi for t, gi in zip(leaves, g)]
    meta = loop.meta_sampler.columns
    value = F.cross_entropy(
        torch.func.functional_call(model, dict(zip(names, theta1)), (meta["x"],)), meta["y"]
    )
    expected = torch.autograd.grad(value, phi)[0]
    torch.testing.assert_close(update.grad, expected, rtol=1e-9, atol=1e-12)


def test_meta_weight_net_with_a_batch_of_one_says_nothing_is_learned():
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)

    def notes(batch_size):
        return BilevelTrainer(
            MLP(**data.model_kwargs, hidden=8),
            MetaWeightNet(data.names, hidden=5),
            build("first_order"),
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(steps=5, batch_size=batch_size, progress=False),
        ).notes

    assert any("always 1 and nothing is learned" in n for n in notes(1))
    assert not any("nothing is learned" in n for n in notes(8))


def test_odm_policy_follows_exp3():
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16)
    model = MLP(**data.model_kwargs, hidden=8)
    odm = build("odm", smoothing=0.5)
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        odm,
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=20, outer_every=1, batch_size=16, progress=False),
    )
    trainer.fit()
    k, t = 4, odm._state["t"]
    eps = lambda s: min(1 / k, math.sqrt(math.log(k) / (k * s)))  # noqa: E731
    rewards = odm._state["rewards"]
    expected = (1 - k * eps(t)) * torch.softmax(eps(t - 1) * rewards, 0) + eps(t)
    torch.testing.assert_close(trainer.weights.value().double(), expected, rtol=1e-5, atol=1e-6)
    assert t == 20 and torch.all(rewards > 0)


def test_loss_factors_are_bounded_mean_one_and_discount_high_losses():
    losses = torch.tensor([0.1, 0.2, 0.3, 5.0])
    down = loss_factors(losses, "down", 0.4, 2.0)
    up = loss_factors(losses, "up", 0.4, 2.0)
    assert down.mean().item() == pytest.approx(1.0) and up.mean().item() == pytest.approx(1.0)
    assert down.argmin() == 3 and up.argmax() == 3
    assert torch.all(down > 0) and down.max() / down.min() <= (1 + 0.8) / (1 - 0.8) + 1e-6
    with pytest.raises(ValueError, match="strength \\* clip < 1"):
        build("loss_reweighting", strength=0.6, clip=2.0)
    for bad in ({"clip": True}, {"strength": "abc"}, {"strength": float("nan")}):
        with pytest.raises(ValueError, match="loss_reweighting: need strength >= 0"):
            build("loss_reweighting", **bad)  # True read as clip=1; 'abc' a TypeError


def test_doge_is_first_order_stepped_by_mirror_descent():
    data = noisy_domains(per_domain=64, meta_size=32, test_size=32)

    def run(solver, outer):
        torch.manual_seed(0)
        model = MLP(**data.model_kwargs, hidden=8)
        trainer = BilevelTrainer(
            model,
            DomainWeights(data.names),
            solver,
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(steps=30, outer_every=5, batch_size=16, progress=False),
            outer_optimizer=outer,
        )
        return trainer.fit()["weights"]

    doge = run(build("doge", lr=0.7), None)
    reference = run(build("first_order"), lambda ps: MirrorDescent(ps, lr=0.7))
    assert doge == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("name", ["first_order", "sama", "unrolled"])
def test_a_step_size_per_tensor_is_the_derivative_through_that_step(name):
    # bilevel.hypergradient(inner_lr=[...]): one lr per tensor of params, as an optimizer whose
    # parameter groups have learning rates of their own steps them
    model, per_domain, outer, weights = mlp_problem()
    params = bilevel.functional.trainable_params(model)
    lrs = [0.3, 0.3, 0.05, 0.05]
    names = list(params)
    logits = weights.logits.detach().clone().requires_grad_(True)
    w = torch.softmax(logits, 0)
    theta = [params[n].clone().requires_grad_(True) for n in names]
    g = torch.autograd.grad(w @ per_domain(dict(zip(names, theta))), theta, create_graph=True)
    stepped = [t - lr * gi for t, gi, lr in zip(theta, g, lrs)]
    if name == "unrolled":  # exact: M after that step, differentiated to the logits
        expected = torch.autograd.grad(outer(dict(zip(names, stepped))), logits)[0]
    else:  # first-order: grad M at theta, not after the step
        g_meta = torch.autograd.grad(outer(dict(zip(names, theta))), theta)
        lookahead = sum((gm.detach() * s).sum() for gm, s in zip(g_meta, stepped))
        expected = torch.autograd.grad(lookahead, logits)[0]
    solver = build(name, steps=1) if name == "unrolled" else build(name)
    got = bilevel.hypergradient(solver, per_domain, outer, params, weights, inner_lr=lrs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    if name == "unrolled":
        higher = build("unrolled", steps=1, backend="higher")
        torch.testing.assert_close(
            bilevel.hypergradient(higher, per_domain, outer, params, weights, inner_lr=lrs), got
        )
    with pytest.raises(ValueError, match=r"inner_lr: one step size per tensor of params \(4\)"):
        bilevel.hypergradient(solver, per_domain, outer, params, weights, inner_lr=lrs[:3])


def test_loss_factors_under_data_parallel_are_those_of_the_global_batch():
    # two ranks (threads) each with half of the batch: their factors, put together, are the
    # factors of one process on the whole batch (each rank's own z-scores were not)
    import threading

    torch.manual_seed(0)
    losses = torch.cat([torch.rand(32), torch.rand(32) * 3])  # halves with other statistics
    barrier, sent = threading.Barrier(2), [None, None]
    out = [None, None]

    def rank(r):
        def reduce(tensors):
            sent[r] = tensors[0]
            barrier.wait()
            mean = (sent[0] + sent[1]) / 2
            barrier.wait()
            return [mean]

        out[r] = loss_factors(losses[32 * r : 32 * (r + 1)], "down", 0.4, 2.0, reduce, 2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    whole = loss_factors(losses, "down", 0.4, 2.0)
    torch.testing.assert_close(torch.cat(out), whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss_factors(losses[:32], "down", 0.4, 2.0), whole[:32], atol=1e-3)
