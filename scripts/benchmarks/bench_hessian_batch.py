"""How biased is an implicit hypergradient whose H and J_L come from the same minibatch?

A ridge-regression bilevel problem (K domains, closed-form inner solution) is small enough for
the exact full-data hypergradient g = -J_L H^-1 grad M. A trainer estimates it from a minibatch
B of training rows: ``same`` takes H and J_L from B (what the trainer does by default),
``independent`` takes H from a second batch B' (``trainer.hessian_batch=independent``). Both are
solved exactly (CG to convergence) at theta*, so the only error left is the sampling of the
batches. Averaging each estimator over many batches gives its bias, |E[g_hat] - g| / |g|,
with a standard error from the spread of the estimates.

    python scripts/benchmarks/bench_hessian_batch.py                 # the README table
    python scripts/benchmarks/bench_hessian_batch.py --quick         # a few seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import bilevel
from bilevel import DomainWeights
from bilevel.solvers import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int  # noqa: E402


class Ridge:
    """K domains of linear-regression rows; inner L_k = mean sq. error / 2 + mu/2 |theta|^2."""

    def __init__(self, k=4, d=8, n=400, m=200, mu=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        truth = torch.randn(d, generator=g, dtype=dt)
        self.k, self.d, self.mu = k, d, mu
        xs, ys = [], []
        for i in range(k):
            scale = torch.linspace(0.3, 2.0, d, dtype=dt) * (1 + 0.5 * i)
            x = torch.randn(n, d, generator=g, dtype=dt) * scale
            shift = 0.6 * i * torch.randn(d, generator=g, dtype=dt)
            xs.append(x)
            ys.append(x @ (truth + shift) + 0.3 * torch.randn(n, generator=g, dtype=dt))
        self.x = torch.cat(xs)
        self.y = torch.cat(ys)
        self.domain = torch.arange(k).repeat_interleave(n)
        self.xm = torch.randn(m, d, generator=g, dtype=dt)
        self.ym = self.xm @ truth

    def per_domain(self, rows):
        x, y, dom = self.x[rows], self.y[rows], self.domain[rows]

        def f(p):
            t = p["theta"]
            err = 0.5 * (x @ t - y) ** 2
            sums = torch.zeros(self.k, dtype=err.dtype).index_add(0, dom, err)
            count = torch.zeros(self.k, dtype=err.dtype).index_add(0, dom, torch.ones_like(err))
            return sums / count.clamp_min(1) + 0.5 * self.mu * (t**2).sum()

        return f

    def meta(self, p):
        return 0.5 * ((self.xm @ p["theta"] - self.ym) ** 2).mean()

    def solution(self, w):
        a = torch.zeros(self.d, self.d, dtype=torch.float64)
        b = torch.zeros(self.d, dtype=torch.float64)
        for k in range(self.k):
            x, y = self.x[self.domain == k], self.y[self.domain == k]
            a += w[k] * (x.T @ x / len(x) + self.mu * torch.eye(self.d, dtype=torch.float64))
            b += w[k] * x.T @ y / len(x)
        return torch.linalg.solve(a, b)


def batch_rows(problem: Ridge, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` rows, an equal share of each domain, drawn with replacement."""
    per = size // problem.k
    n = len(problem.x) // problem.k
    return torch.cat([k * n + torch.randint(0, n, (per,), generator=gen) for k in range(problem.k)])


def measure(problem: Ridge, size: int, draws: int, seed: int = 0) -> dict[str, float]:
    weights = DomainWeights(
        [f"d{k}" for k in range(problem.k)], init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64
    )
    w = weights.value().detach()
    theta = {"theta": problem.solution(w)}
    solver = build("cg", iters=4 * problem.d, tol=1e-13)
    full = torch.arange(len(problem.x))
    exact = bilevel.hypergradient(
        solver, problem.per_domain(full), problem.meta, theta, weights, wrt="values"
    )
    gen = torch.Generator().manual_seed(seed)
    estimates: dict[str, list[torch.Tensor]] = {"same": [], "independent": []}
    for _ in range(draws):
        rows, other = batch_rows(problem, size, gen), batch_rows(problem, size, gen)
        loss = problem.per_domain(rows)
        for kind, hess in (("same", None), ("independent", problem.per_domain(other))):
            estimates[kind].append(
                bilevel.hypergradient(
                    solver, loss, problem.meta, theta, weights, wrt="values", hessian_loss=hess
                )
            )
    out = {}
    for kind, values in estimates.items():
        stack = torch.stack(values)
        mean = stack.mean(0)
        out[kind] = ((mean - exact).norm() / exact.norm()).item()
        out[f"{kind}_se"] = (stack.std(0).norm() / draws**0.5 / exact.norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[24, 48, 96, 192, 384])
    parser.add_argument("--draws", type=positive_int, default=4000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.draws = [48, 96], 200
    problem = Ridge()
    print("| batch | bias, H and J_L from one batch | bias, H from an independent batch |")
    print("|---|---|---|")
    for size in args.sizes:
        r = measure(problem, size, args.draws)
        print(
            f"| {size} | {100 * r['same']:.2f}% ± {100 * r['same_se']:.2f} | "
            f"{100 * r['independent']:.2f}% ± {100 * r['independent_se']:.2f} |"
        )


if __name__ == "__main__":
    main()
