"""Finite-difference products against autograd; exact restore of perturbed parameters; the fused
H u / J_L u product; warm-started solvers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.functional import trainable_params
from bilevel.solvers import build
from bilevel.solvers.finite_difference import FiniteDifferenceProducts, ModulePoint
from bilevel.solvers.products import InnerProducts, leaves
from tests.solvers.test_solvers import Ridge

K = 3


def mlp_problem(dtype=torch.float64, activation=nn.Tanh, seed=0, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), activation(), nn.Dropout(dropout), nn.Linear(12, 3)).to(
        dtype
    )
    train = {
        "x": torch.randn(48, 5, generator=g, dtype=dtype),
        "y": torch.randint(0, 3, (48,), generator=g),
        "domain": torch.arange(48) % K,
    }
    meta = {"x": torch.randn(20, 5, generator=g, dtype=dtype), "y": torch.randint(0, 3, (20,))}
    weights = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=dtype)
    per_example = lambda out, b: F.cross_entropy(out, b["y"], reduction="none")  # noqa: E731
    mean_ce = lambda out, b: F.cross_entropy(out, b["y"])  # noqa: E731
    per_domain = make_per_domain_loss(model, train, per_example, K)
    outer = make_outer_loss(model, meta, mean_ce)
    return model, per_domain, outer, weights


SOLVERS = [
    ("first_order", {}),
    ("sama", {}),
    ("neumann", {"iters": 8, "alpha": 0.3}),
    ("cg", {"iters": 10, "damping": 0.1}),
    ("cg", {"iters": 3, "damping": 0.1, "warm_start": True}),
]


@pytest.mark.parametrize("name,opts", SOLVERS)
def test_finite_differences_match_autograd_in_float64(name, opts):
    model, per_domain, outer, weights = mlp_problem()
    params = trainable_params(model)
    exact = bilevel.hypergradient(build(name, **opts), per_domain, outer, params, weights, 0.2)
    approx = bilevel.hypergradient(
        build(name, products="finite_difference", **opts), per_domain, outer, params, weights, 0.2
    )
    assert ((approx - exact).norm() / exact.norm()).item() <= 1e-6


@pytest.mark.parametrize("name,opts", SOLVERS)
def test_finite_differences_see_one_dropout_mask(name, opts):
    """With dropout in training mode each forward pass is another random function: the central
    differences of passes with different masks were noise of order 1/eps (hypergradients of the
    wrong sign, ten times too large). Every pass at a point now replays one random state, the
    one autograd's pass draws from."""
    model, per_domain, outer, weights = mlp_problem(dropout=0.3)
    params = trainable_params(model)

    def hypergradient(products):
        torch.manual_seed(7)
        solver = build(name, products=products, **opts)
        return bilevel.hypergradient(solver, per_domain, outer, params, weights, 0.2)

    exact, approx = hypergradient("autograd"), hypergradient("finite_difference")
    assert ((approx - exact).norm() / exact.norm()).item() <= 1e-6
    torch.manual_seed(7)
    before = torch.rand(3)
    hypergradient("finite_difference")  # the global random stream is left as it was
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), before)


def test_module_point_replays_one_dropout_mask():
    model, per_domain, outer, weights = mlp_problem(dropout=0.3)
    params = list(model.parameters())
    w = weights.value().detach()
    x = torch.randn(16, 5, dtype=torch.float64)

    def losses_fn():
        return model(x).pow(2).mean(1)[:K]

    def grad_fn():
        losses = losses_fn()
        return list(torch.autograd.grad(torch.dot(w, losses), params)), losses

    u = [torch.randn_like(p) for p in params]
    torch.manual_seed(3)
    grads = torch.autograd.grad(torch.dot(w, losses_fn()), params, create_graph=True)
    exact = torch.autograd.grad(grads, params, u)
    torch.manual_seed(3)
    approx = FiniteDifferenceProducts(ModulePoint(params, losses_fn, grad_fn)).hvp(u)
    for a, b in zip(approx, exact):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_products_agree_and_fused_product_equals_separate_ones():
    model, per_domain, outer, weights = mlp_problem()
    names, theta = leaves(trainable_params(model))
    w = weights.value().detach()
    u = [torch.randn_like(t) for t in theta]
    ad = InnerProducts.at(per_domain, names, theta, w)
    from bilevel.solvers.finite_difference import FunctionalPoint

    fd = FiniteDifferenceProducts(FunctionalPoint(per_domain, names, theta, w))
    for products in (ad, fd):
        hu, jl = products.hvp_jvp(u)
        for a, b in zip(hu, products.hvp(u)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(jl, products.domain_jvp(u), rtol=1e-9, atol=1e-12)
    for a, b in zip(ad.hvp(u), fd.hvp(u)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ad.domain_jvp(u), fd.domain_jvp(u), rtol=1e-6, atol=1e-9)


def test_module_point_restores_parameters_bit_for_bit():
    model, per_domain, outer, weights = mlp_problem(torch.float32)
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    w = weights.value().detach().float()
    x = torch.randn(16, 5)

    def losses_fn():
        return model(x).pow(2).mean(1)[:K]

    def grad_fn():
        losses = losses_fn()
        return list(torch.autograd.grad(torch.dot(w, losses), params)), losses

    products = FiniteDifferenceProducts(ModulePoint(params, losses_fn, grad_fn))
    direction = [torch.randn_like(p) * 3.7 for p in params]
    products.hvp(direction)
    products.domain_jvp(direction)
    products.hvp_jvp(direction)
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bitwise, not approximately


def test_finite_difference_step_is_validated():
    with pytest.raises(ValueError, match="fd_step"):
        build("cg", products="finite_difference", fd_step=2.0)
    with pytest.raises(ValueError, match="unknown products"):
        build("first_order", products="symbolic")
    for name in ("first_order", "neumann", "cg", "sama"):  # a step of no product: no effect
        with pytest.raises(ValueError, match="applies to products=finite_difference only"):
            build(name, fd_step=1e-3)
        build(name, products="finite_difference", fd_step=1e-3)


# -- warm starts ---------------------------------------------------------------------------------


def ridge_call(solver, problem=None):
    problem = problem or Ridge()
    w = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    theta = {"theta": problem.solution(w.value().detach())}
    return bilevel.hypergradient(solver, problem.per_domain, problem.meta, theta, w, 0.1)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("cg", {}),
        ("neumann", {"alpha": 0.05}),
        ("neumann", {"alpha": 0.05, "simultaneous": True}),
        ("cg", {"damping": 0.2}),
    ],
)
def test_repeated_warm_calls_converge_to_the_cold_answer(name, opts):
    problem = Ridge()
    cold_opts = {k: v for k, v in opts.items() if k != "simultaneous"}
    cold = ridge_call(build(name, iters=400, **cold_opts), problem)
    warm = build(name, iters=1, warm_start=True, **opts)
    for _ in range(200):
        got = ridge_call(warm, problem)
    assert ((got - cold).norm() / cold.norm()).item() <= 1e-4


@pytest.mark.parametrize(
    "name,opts",
    [("cg", {}), ("neumann", {"alpha": 0.05}), ("neumann", {"alpha": 0.05, "simultaneous": True})],
)
def test_one_non_finite_call_does_not_poison_a_warm_solver(name, opts):
    """A call on a non-finite meta loss (one bad batch, whose update the trainer skips) left
    NaN in the kept solution, and every later warm neumann call returned NaN: the run went on
    skipping until it stopped. Now that call is NaN (simultaneous too, though it returns the
    previous v's product), the kept solution is forgotten, and later calls converge again."""
    problem = Ridge()
    cold_opts = {k: v for k, v in opts.items() if k != "simultaneous"}
    cold = ridge_call(build(name, iters=400, **cold_opts), problem)
    warm = build(name, iters=1, warm_start=True, **opts)
    for _ in range(3):
        ridge_call(warm, problem)
    w = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    theta = {"theta": problem.solution(w.value().detach())}
    nan_meta = lambda p: problem.meta(p) * float("nan")  # noqa: E731
    assert torch.isnan(
        bilevel.hypergradient(warm, problem.per_domain, nan_meta, theta, w, 0.1)
    ).all()
    assert all(torch.isfinite(t).all() for t in warm._warm.v)
    for _ in range(200):
        got = ridge_call(warm, problem)
    assert ((got - cold).norm() / cold.norm()).item() <= 1e-4


def test_simultaneous_neumann_takes_one_product_per_call_and_lags_one_update(monkeypatch):
    """SOBA's order: J_L of the kept v and H v from one backward pass, then v moves. Its
    hypergradient is the default's of the previous call (same problem, same v sequence)."""
    calls = []
    original = InnerProducts._backward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InnerProducts, "_backward", counted)
    problem = Ridge()
    simultaneous = build("neumann", iters=1, alpha=0.05, warm_start=True, simultaneous=True)
    default = build("neumann", iters=1, alpha=0.05, warm_start=True)
    cold_first = build("neumann", iters=0, alpha=0.05)  # v = alpha g: -J_L (alpha g)
    previous = ridge_call(cold_first, problem)
    for _ in range(5):
        calls.clear()
        got = ridge_call(simultaneous, problem)
        assert len(calls) == 1  # one backward pass: H v and J_L v together
        # call t returns what the default's call t - 1 returned (call 1: the cold alpha g)
        torch.testing.assert_close(got, previous, rtol=1e-12, atol=1e-15)
        calls.clear()
        previous = ridge_call(default, problem)
        assert len(calls) == 2
    with pytest.raises(ValueError, match="simultaneous needs warm_start=true and iters=1"):
        build("neumann", iters=2, warm_start=True, simultaneous=True)


@pytest.mark.parametrize("name", ["cg", "neumann"])
def test_a_fresh_or_reset_warm_solver_starts_cold(name):
    problem = Ridge()
    cold = ridge_call(build(name, iters=1), problem)
    warm = build(name, iters=1, warm_start=True)
    first = ridge_call(warm, problem)
    torch.testing.assert_close(first, cold, rtol=1e-12, atol=0)
    second = ridge_call(warm, problem)
    assert not torch.allclose(second, cold)
    warm.reset()
    torch.testing.assert_close(ridge_call(warm, problem), cold, rtol=1e-12, atol=0)
    state = warm.state_dict()
    other = build(name, iters=1, warm_start=True)
    other.load_state_dict(state)
    torch.testing.assert_close(ridge_call(other, problem), ridge_call(warm, problem))


def test_warm_cg_takes_the_kept_solution_at_its_best_scale():
    """The kept x0 is rescaled to the best multiple of itself and the first direction made
    A-conjugate to it, so a kept solution of the wrong size or sign (the system changed since,
    e.g. the weights moved) costs nothing: x0 and -50 x0 give the same answer. Before, x0 was
    taken as it stood (a residual larger than |g| dropped it for a cold start)."""
    problem = Ridge()
    warm = build("cg", iters=1, warm_start=True)
    ridge_call(warm, problem)
    kept = [t.clone() for t in warm._warm.v]
    first = ridge_call(warm, problem)
    warm._warm.v = [t * -50.0 for t in kept]
    torch.testing.assert_close(ridge_call(warm, problem), first, rtol=1e-10, atol=0)


def test_warm_cg_lands_on_the_minimum_over_the_kept_solution_and_the_residual():
    """One iteration from any kept x0 (here random) reaches the minimum of the quadratic
    q(x) = x'Ax/2 - g'x over span{x0, r}: below q(0) and q(a x0) for every a."""
    problem = Ridge()
    w = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    values = w.value().detach()
    theta = problem.solution(values).requires_grad_(True)
    (g,) = torch.autograd.grad(problem.meta({"theta": theta}), theta)
    hessian = problem.hessian(values)
    x0 = torch.randn(problem.d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def q(x):
        return (0.5 * x @ hessian @ x - g @ x).item()

    warm = build("cg", iters=1, warm_start=True)
    warm._warm.v = [x0.clone()]
    ridge_call(warm, problem)
    (x,) = warm._warm.v
    r = g - (g @ x0) / (x0 @ hessian @ x0) * (hessian @ x0)
    basis = torch.stack([x0, r], 1)  # the minimum over span{x0, r}, solved densely
    coef = torch.linalg.solve(basis.T @ hessian @ basis, basis.T @ g)
    torch.testing.assert_close(x, basis @ coef, rtol=1e-10, atol=1e-12)
    assert q(x) <= min(q(torch.zeros_like(x0)), q((g @ x0) / (x0 @ hessian @ x0) * x0))


def test_warm_cg_starts_cold_from_a_non_finite_kept_solution_and_recovers():
    """A NaN kept x0 (e.g. from a step on a non-finite batch) must not reach the residual:
    the call equals a cold one, and the solution kept after it is finite again."""
    problem = Ridge()
    cold = ridge_call(build("cg", iters=1), problem)
    warm = build("cg", iters=1, warm_start=True)
    ridge_call(warm, problem)
    warm._warm.v = [torch.full_like(t, float("nan")) for t in warm._warm.v]
    torch.testing.assert_close(ridge_call(warm, problem), cold, rtol=1e-12, atol=0)
    assert all(torch.isfinite(t).all() for t in warm._warm.v)


def _peak_mb(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def test_implicit_solvers_hold_a_few_gradients_of_memory():
    # the solvers keep r, p and one product (cg) or g, v and one product (neumann), in place;
    # before that, cg(5) held about 8 gradients' worth on MiniLM
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))
    train = {"x": x, "y": y, "domain": torch.arange(512) % 4}
    meta = {"x": x[:64], "y": y[:64]}
    per_example = lambda out, b: F.cross_entropy(out, b["y"], reduction="none")  # noqa: E731
    mean_ce = lambda out, b: F.cross_entropy(out, b["y"])  # noqa: E731
    params = list(model.parameters())
    weights = DomainWeights(list("abcd"))
    plain = _peak_mb(lambda: torch.autograd.grad(mean_ce(model(x), train), params))
    for name, opts, bound in [
        ("cg", {"iters": 5}, 4.0),
        ("neumann", {"iters": 5}, 4.0),
        ("cg", {"iters": 5, "products": "finite_difference"}, 2.5),
    ]:
        used = _peak_mb(
            lambda name=name, opts=opts: bilevel.hypergradient(
                build(name, **opts),
                make_per_domain_loss(model, train, per_example, 4),
                make_outer_loss(model, meta, mean_ce),
                trainable_params(model),
                weights,
            )
        )
        assert used <= bound * plain, (name, opts, used / plain)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_loss_value_marks_the_product_and_a_finite_one_leaves_it_exact(bad):
    from bilevel.solvers.products import poison_nonfinite

    result = torch.tensor([1.5, -2.0, 3.0e-30], dtype=torch.float64)
    huge = torch.tensor([3.0e38, 3.0e38])  # finite, though their float32 sum is not
    assert torch.equal(poison_nonfinite(result, huge), result)
    assert torch.equal(poison_nonfinite(result, huge, torch.zeros(1)), result)
    marked = poison_nonfinite(result, torch.tensor([0.5, bad]), huge)
    assert marked.dtype == result.dtype and torch.isnan(marked).all()
