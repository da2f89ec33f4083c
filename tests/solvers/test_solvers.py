"""Solvers against closed forms (ridge regression) and against autograd through explicit steps."""

import subprocess
import sys

import pytest
import torch

import bilevel
from bilevel import DomainWeights
from bilevel.solvers import build

PARAMS = ["softmax", "exp"]


class Ridge:
    """K ridge-regression domains; inner L_k = mean sq. error/2 + mu/2 |theta|^2, meta = MSE/2."""

    def __init__(self, k=3, d=6, n=40, m=30, mu=0.3, seed=0):
        dtype = torch.float64
        g = torch.Generator().manual_seed(seed)
        self.d, self.mu, self.dtype = d, mu, dtype
        truth = torch.randn(d, generator=g, dtype=dtype)
        self.X = [torch.randn(n, d, generator=g, dtype=dtype) * (1 + i) for i in range(k)]
        self.y = [
            X @ (truth + 0.8 * i * torch.randn(d, generator=g, dtype=dtype))
            + 0.1 * torch.randn(n, generator=g, dtype=dtype)
            for i, X in enumerate(self.X)
        ]
        self.Xm = torch.randn(m, d, generator=g, dtype=dtype)
        self.ym = self.Xm @ truth
        eye = torch.eye(d, dtype=dtype)
        self.A = [X.T @ X / len(X) + mu * eye for X in self.X]
        self.b = [X.T @ y / len(X) for X, y in zip(self.X, self.y)]

    def to(self, dtype):
        """The same problem in another dtype."""
        for name in ["X", "y", "A", "b"]:
            setattr(self, name, [t.to(dtype) for t in getattr(self, name)])
        self.Xm, self.ym, self.dtype = self.Xm.to(dtype), self.ym.to(dtype), dtype
        return self

    def per_domain(self, p):
        t = p["theta"]
        return torch.stack(
            [
                0.5 * ((X @ t - y) ** 2).mean() + 0.5 * self.mu * (t**2).sum()
                for X, y in zip(self.X, self.y)
            ]
        )

    def meta(self, p):
        return 0.5 * ((self.Xm @ p["theta"] - self.ym) ** 2).mean()

    def hessian(self, w):
        return sum(wk * A for wk, A in zip(w, self.A))

    def solution(self, w):
        return torch.linalg.solve(self.hessian(w), sum(wk * b for wk, b in zip(w, self.b)))

    def true_hypergradient(self, weights):
        """d meta(theta*(w(logits))) / d logits by autograd through a dense solve."""
        logits = weights.logits.detach().clone().requires_grad_(True)
        w = bilevel.weights.apply_parametrization(weights.parametrization, logits)
        value = self.meta({"theta": self.solution(w)})
        return torch.autograd.grad(value, logits)[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def weights_for(problem, param, dtype=torch.float64):
    init = [0.5, 0.3, 0.2] if param == "softmax" else [1.0, 0.6, 1.7]
    return DomainWeights(["a", "b", "c"], parametrization=param, init=init, dtype=dtype)


@pytest.mark.parametrize("param", PARAMS)
def test_cg_matches_closed_form(param):
    problem = Ridge()
    w = weights_for(problem, param)
    theta = {"theta": problem.solution(w.value().detach())}
    got = bilevel.hypergradient(
        build("cg", iters=problem.d), problem.per_domain, problem.meta, theta, w
    )
    assert rel_err(got, problem.true_hypergradient(w)) <= 1e-4


@pytest.mark.parametrize("param", PARAMS)
def test_neumann_matches_closed_form(param):
    problem = Ridge()
    w = weights_for(problem, param)
    wv = w.value().detach()
    lam_max = torch.linalg.eigvalsh(problem.hessian(wv)).max().item()
    solver = build("neumann", iters=400, alpha=0.9 / lam_max)
    theta = {"theta": problem.solution(wv)}
    got = bilevel.hypergradient(solver, problem.per_domain, problem.meta, theta, w)
    assert rel_err(got, problem.true_hypergradient(w)) <= 2e-2


def test_neumann_truncation_error_shrinks_with_iters():
    problem = Ridge()
    w = weights_for(problem, "softmax")
    wv = w.value().detach()
    lam_max = torch.linalg.eigvalsh(problem.hessian(wv)).max().item()
    theta = {"theta": problem.solution(wv)}
    truth = problem.true_hypergradient(w)
    errs = [
        rel_err(
            bilevel.hypergradient(
                build("neumann", iters=i, alpha=0.9 / lam_max),
                problem.per_domain,
                problem.meta,
                theta,
                w,
            ),
            truth,
        )
        for i in (2, 20, 200)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_a_diverging_neumann_series_is_nan_and_counted_for_the_end_of_the_run():
    """alpha = 3 / lambda_max doubles the top eigendirection of the residual at every product:
    its v was 2^20 times too large and the hypergradient a large wrong number. It is NaN now
    (the trainer skips it) and the solver's notes say why; alpha = 0.9 / lambda_max is not
    touched. The count is part of the solver's state, so a resumed run reports it whole."""
    problem = Ridge()
    w = weights_for(problem, "softmax")
    wv = w.value().detach()
    lam_max = torch.linalg.eigvalsh(problem.hessian(wv)).max().item()
    theta = {"theta": problem.solution(wv)}

    def run(solver):
        return bilevel.hypergradient(solver, problem.per_domain, problem.meta, theta, w)

    fine = build("neumann", iters=20, alpha=0.9 / lam_max)
    assert torch.isfinite(run(fine)).all() and fine.notes() == []
    diverging = build("neumann", iters=20, alpha=3.0 / lam_max)
    assert torch.isnan(run(diverging)).all()
    (note,) = diverging.notes()
    assert "diverged in 1 of 1 hypergradients" in note and "lower solver.alpha" in note
    resumed = build("neumann", iters=20, alpha=3.0 / lam_max)
    resumed.load_state_dict(diverging.state_dict())
    run(resumed)
    assert "diverged in 2 of 2 hypergradients" in resumed.notes()[0]
    # a checkpoint from before the count existed holds only the warm start
    older = build("neumann", iters=20, alpha=0.9 / lam_max)
    older.load_state_dict({"v": None})
    assert older.notes() == []


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("backend", ["torch", "higher"])
def test_unrolled_matches_explicit_sgd(param, backend):
    problem, steps, lr = Ridge(), 4, 0.05
    w = weights_for(problem, param)
    theta0 = torch.randn(problem.d, dtype=torch.float64)
    # Truth: the SGD steps written out in closed form (affine in theta), differentiated by autograd.
    logits = w.logits.detach().clone().requires_grad_(True)
    wv = bilevel.weights.apply_parametrization(param, logits)
    t = theta0
    for _ in range(steps):
        t = t - lr * (problem.hessian(wv) @ t - sum(wk * b for wk, b in zip(wv, problem.b)))
    truth = torch.autograd.grad(problem.meta({"theta": t}), logits)[0]
    solver = build("unrolled", steps=steps, backend=backend)
    got = bilevel.hypergradient(
        solver, problem.per_domain, problem.meta, {"theta": theta0}, w, inner_lr=lr
    )
    torch.testing.assert_close(got, truth, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("param", PARAMS)
def test_first_order_formula(param):
    problem, lr = Ridge(), 0.07
    w = weights_for(problem, param)
    theta = torch.randn(problem.d, dtype=torch.float64)
    g_meta = problem.Xm.T @ (problem.Xm @ theta - problem.ym) / len(problem.Xm)
    a = torch.stack([(A @ theta - b) @ g_meta for A, b in zip(problem.A, problem.b)])
    logits = w.logits.detach().clone().requires_grad_(True)
    wv = bilevel.weights.apply_parametrization(param, logits)
    truth = torch.autograd.grad(wv, logits, -lr * a)[0]
    got = bilevel.hypergradient(
        build("first_order"), problem.per_domain, problem.meta, {"theta": theta}, w, inner_lr=lr
    )
    torch.testing.assert_close(got, truth, rtol=1e-6, atol=1e-12)


def test_values_gradient_and_dtype_float32():
    problem64 = Ridge()
    problem32 = Ridge().to(torch.float32)
    w64 = weights_for(problem64, "softmax")
    w32 = weights_for(problem32, "softmax", dtype=torch.float32)
    theta = problem64.solution(w64.value().detach())
    g64 = bilevel.hypergradient(
        build("cg", iters=6),
        problem64.per_domain,
        problem64.meta,
        {"theta": theta},
        w64,
        wrt="values",
    )
    g32 = bilevel.hypergradient(
        build("cg", iters=6),
        problem32.per_domain,
        problem32.meta,
        {"theta": theta.float()},
        w32,
        wrt="values",
    )
    assert g32.dtype == torch.float32 and g32.shape == (3,)
    assert rel_err(g32.double(), g64) < 1e-3


def test_cg_tolerance_stops_updates_without_breaking():
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = {"theta": problem.solution(w.value().detach())}
    many = bilevel.hypergradient(
        build("cg", iters=50, tol=1e-10), problem.per_domain, problem.meta, theta, w
    )
    assert torch.isfinite(many).all()
    assert rel_err(many, problem.true_hypergradient(w)) <= 1e-6


def test_cg_damping_solves_shifted_system():
    problem = Ridge()
    w = weights_for(problem, "exp")
    wv = w.value().detach()
    theta = problem.solution(wv)
    damping = 0.5
    g_meta = problem.Xm.T @ (problem.Xm @ theta - problem.ym) / len(problem.Xm)
    v = torch.linalg.solve(
        problem.hessian(wv) + damping * torch.eye(problem.d, dtype=torch.float64), g_meta
    )
    a = -torch.stack([(A @ theta - b) @ v for A, b in zip(problem.A, problem.b)])
    got = bilevel.hypergradient(
        build("cg", iters=problem.d, damping=damping),
        problem.per_domain,
        problem.meta,
        {"theta": theta},
        w,
        wrt="values",
    )
    torch.testing.assert_close(got, a, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name,opts", [("cg", {"iters": 6}), ("neumann", {"iters": 400})])
def test_the_optimizers_weight_decay_enters_the_hessian(name, opts):
    # Ridge's L2 term moved from the loss into SGD's weight_decay: the inner steps minimize
    # the same objective, so the implicit hypergradient must be the same closed form
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = problem.solution(w.value().detach())

    def loss_alone(p):
        return problem.per_domain(p) - 0.5 * problem.mu * (p["theta"] ** 2).sum()

    param = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([param], lr=0.1, weight_decay=problem.mu)
    args = (build(name, **opts), loss_alone, problem.meta, {"theta": theta}, w)
    got = bilevel.hypergradient(*args, optimizer=sgd)
    truth = problem.true_hypergradient(w)
    assert rel_err(got, truth) <= 1e-6
    assert rel_err(bilevel.hypergradient(*args), truth) > 0.05  # without it: 8% off here
    adamw = torch.optim.AdamW([param], lr=0.1, weight_decay=problem.mu)  # decoupled: no L2
    torch.testing.assert_close(
        bilevel.hypergradient(*args, optimizer=adamw), bilevel.hypergradient(*args)
    )


def test_params_are_not_modified():
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = torch.randn(problem.d, dtype=torch.float64)
    before = theta.clone()
    for name in ["first_order", "unrolled", "neumann", "cg"]:
        bilevel.hypergradient(build(name), problem.per_domain, problem.meta, {"theta": theta}, w)
    assert torch.equal(theta, before) and not theta.requires_grad


# -- bad input -------------------------------------------------------------------------------


def test_unknown_solver_names_valid_ones():
    with pytest.raises(ValueError, match="valid solvers: cg, .*first_order, .*neumann, .*sama"):
        build("adam")


@pytest.mark.parametrize(
    "name,opts,match",
    [
        ("cg", {"alpha": 0.1}, "valid options: iters, damping, tol"),
        ("first_order", {"steps": 3}, r"valid options: products, fd_step"),
        ("unrolled", {"steps": 0}, "steps must be"),
        ("unrolled", {"backend": "jax"}, "torch, higher"),
        ("neumann", {"alpha": -1.0}, "alpha must be a finite number > 0"),
        ("neumann", {"alpha": float("inf")}, "alpha must be a finite number > 0"),
        ("cg", {"damping": float("inf")}, "damping must be a finite number >= 0"),
        ("cg", {"fd_step": "abc"}, "fd_step must lie in"),
        ("cg", {"iters": 0}, "iters must be"),
    ],
)
def test_bad_solver_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        build(name, **opts)


@pytest.mark.parametrize("name", ["first_order", "unrolled", "neumann", "cg"])
def test_wrong_per_domain_shape_names_both_shapes(name):
    problem = Ridge()
    w = weights_for(problem, "softmax")
    bad = lambda p: problem.per_domain(p)[:2]  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        bilevel.hypergradient(
            build(name),
            bad,
            problem.meta,
            {"theta": torch.zeros(problem.d, dtype=torch.float64)},
            w,
        )


EVERY = ["first_order", "unrolled", "neumann", "cg", "sama"]


@pytest.mark.parametrize("name", EVERY)
def test_a_bad_outer_loss_or_integer_params_are_named_by_every_solver(name):
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = {"theta": torch.zeros(problem.d, dtype=torch.float64)}
    call = lambda meta, params=theta: bilevel.hypergradient(  # noqa: E731
        build(name), problem.per_domain, meta, params, w
    )
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar, got shape \(3,\)"):
        call(lambda p: p["theta"][:3] ** 2)
    with pytest.raises(ValueError, match="outer_loss must return a scalar tensor, got float"):
        call(lambda p: 1.0)
    with pytest.raises(ValueError, match=r"params\['theta'\] is torch.int64"):
        call(problem.meta, {"theta": torch.zeros(problem.d, dtype=torch.int64)})
    # a meta loss that does not depend on the parameters: the hypergradient is exactly zero,
    # and a warning says why
    with pytest.warns(UserWarning, match="outer_loss carries no gradient back to params"):
        zero = call(lambda p: torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(zero.abs(), torch.zeros_like(zero))


def test_bad_arguments_of_the_public_api_are_named():
    """What used to fail deep inside a solver (AttributeError, KeyError) or return a wrong
    number (a negative inner_lr flips first_order's sign) is refused with the argument named."""
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = {"theta": torch.zeros(problem.d, dtype=torch.float64)}

    def call(solver="first_order", params=theta, weights=w, inner_lr=0.1):
        return bilevel.hypergradient(
            solver, problem.per_domain, problem.meta, params, weights, inner_lr
        )

    for lr in (-0.1, float("inf"), float("nan"), "0.1"):
        with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
            call(inner_lr=lr)
    with pytest.raises(TypeError, match="params must be a non-empty dict"):
        call(params={})
    with pytest.raises(TypeError, match="params must be a non-empty dict"):
        call(params=[theta["theta"]])
    with pytest.raises(TypeError, match="weights must be a bilevel.DomainWeights"):
        call(weights=torch.ones(3))
    with pytest.raises(TypeError, match="solver must come from bilevel.solvers.build"):
        call(solver=object())
    for method in ("scalebio", "odm", "doge", "loss_reweighting"):  # no hypergradient at a point
        with pytest.raises(TypeError, match=f"{method} is a method of the trainer"):
            call(solver=method)
    with pytest.raises(TypeError, match="per_domain_loss must return a Tensor"):
        bilevel.hypergradient(
            "cg", lambda p: list(problem.per_domain(p)), problem.meta, theta, w, 0.1
        )
    with pytest.raises(TypeError, match=r"params\['theta'\] must be a Tensor, got list"):
        call(params={"theta": [0.0] * problem.d})
    # a schedule may end at lr 0 (first_order is then 0); a solver's name is build(name)
    assert torch.equal(call(inner_lr=0.0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(call(solver="cg"), call(solver=build("cg")))


@pytest.mark.parametrize("name", ["first_order", "unrolled", "neumann", "cg"])
def test_non_finite_is_returned_not_zeroed(name):
    problem = Ridge()
    w = weights_for(problem, "softmax")
    nan_meta = lambda p: problem.meta(p) * float("nan")  # noqa: E731
    got = bilevel.hypergradient(
        build(name),
        problem.per_domain,
        nan_meta,
        {"theta": torch.zeros(problem.d, dtype=torch.float64)},
        w,
    )
    assert not torch.isfinite(got).all()


def test_numpy_numbers_are_numbers():
    """Settings computed with numpy (np.float32 learning rates, np.int64 counts) are accepted
    wherever a Python int or float is; bools and strings are not."""
    import numpy as np

    from bilevel import TrainerConfig
    from bilevel.errors import ConfigError

    build("cg", iters=np.int64(3), damping=np.float32(0.1))
    build("neumann", alpha=np.float64(0.5))
    TrainerConfig(steps=np.int64(10), inner_lr=np.float32(0.1)).validate()
    with pytest.raises(ValueError, match="iters must be an integer"):
        build("cg", iters=True)
    with pytest.raises(ConfigError, match="trainer.steps"):
        TrainerConfig(steps="10").validate()
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = {"theta": torch.zeros(problem.d, dtype=torch.float64)}
    got = bilevel.hypergradient(
        "first_order", problem.per_domain, problem.meta, theta, w, np.float32(0.1)
    )
    torch.testing.assert_close(
        got, bilevel.hypergradient("first_order", problem.per_domain, problem.meta, theta, w, 0.1)
    )


@pytest.mark.parametrize("name", ["first_order", "unrolled", "neumann", "cg", "sama"])
def test_a_per_domain_loss_without_gradient_or_a_frozen_parameter_is_refused(name):
    """Each of these returned a hypergradient of another problem, or exactly zero, without a
    word (first_order, sama), or failed inside autograd (unrolled, neumann, cg): a per-domain
    loss that ignores params or is detached, one of integer dtype, and a frozen base weight
    passed with the trainable ones (``dict(model.named_parameters())`` of a LoRA model)."""
    problem = Ridge()
    w = weights_for(problem, "softmax")
    theta = {"theta": torch.zeros(problem.d, dtype=torch.float64)}

    def call(per_domain, params=theta):
        return bilevel.hypergradient(name, per_domain, problem.meta, params, w, 0.1)

    for detached in (
        lambda p: problem.per_domain(p).detach(),
        lambda p: torch.ones(3, dtype=torch.float64),
    ):
        with pytest.raises(ValueError, match="per_domain_loss carries no gradient back"):
            call(detached)
    with pytest.raises(TypeError, match="per_domain_loss returned int64"):
        call(lambda p: problem.per_domain(p).long())

    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    with pytest.raises(ValueError, match=r"params\['base'\] is a frozen parameter"):
        call(problem.per_domain, {**theta, "base": frozen})
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    assert list(bilevel.trainable_params(model)) == ["weight"]


def test_a_first_hypergradient_warns_nothing_where_warnings_are_errors():
    # torch scripts its forward-mode decompositions at a process's first dual tensor and warns
    # DeprecationWarning for it: a user's suite run with -W error failed inside bilevel
    code = (
        "import torch, bilevel\n"
        "w = bilevel.DomainWeights(['a', 'b'])\n"
        "loss = lambda p: torch.stack([(p['t'] ** 2).sum(), p['t'].sum()])\n"
        "meta = lambda p: ((p['t'] - 1) ** 2).sum()\n"
        "print(bilevel.hypergradient('first_order', loss, meta, {'t': torch.ones(3)}, w))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
