"""The Hessian from an independent batch (hessian_loss) is taken from that batch."""

import torch

import bilevel
from bilevel import (
    DomainWeights,
)
from bilevel.solvers import build


def test_hessian_loss_takes_h_from_the_other_batch():
    torch.manual_seed(0)
    d, k = 5, 3
    xs = [torch.randn(20, d, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(20, dtype=torch.float64) for _ in range(2)]
    dom = torch.arange(20) % k
    xm, ym = torch.randn(9, d, dtype=torch.float64), torch.randn(9, dtype=torch.float64)

    def per_domain(x, y):
        def f(p):
            err = 0.5 * (x @ p["t"] - y) ** 2 + 0.1 * (p["t"] ** 2).sum()
            return torch.zeros(k, dtype=err.dtype).index_add(0, dom, err) / torch.bincount(
                dom, minlength=k
            )

        return f

    meta = lambda p: 0.5 * ((xm @ p["t"] - ym) ** 2).mean()  # noqa: E731
    w = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    theta = {"t": torch.randn(d, dtype=torch.float64)}
    got = bilevel.hypergradient(
        build("cg", iters=50, tol=1e-14),
        per_domain(xs[0], ys[0]),
        meta,
        theta,
        w,
        wrt="values",
        hessian_loss=per_domain(xs[1], ys[1]),
    )
    wv = w.value().detach()
    flat = theta["t"]
    jac = torch.autograd.functional.jacobian(lambda t: per_domain(xs[0], ys[0])({"t": t}), flat)
    hess = torch.autograd.functional.hessian(
        lambda t: wv @ per_domain(xs[1], ys[1])({"t": t}), flat
    )
    g_meta = torch.autograd.functional.jacobian(lambda t: meta({"t": t}), flat)
    torch.testing.assert_close(got, -(jac @ torch.linalg.solve(hess, g_meta)))
