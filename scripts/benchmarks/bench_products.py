"""How far finite-difference hypergradients are from the exact ones, by dtype.

    python scripts/benchmarks/bench_products.py

An MLP (16-64-64-4, tanh or GELU) trained a little on 4 noisy domains; at that point the
first_order and cg(5) hypergradients with ``products="finite_difference"`` are compared with the
exact autograd hypergradient computed in float64. The model and data are cast to each dtype
(float64, float32, bfloat16), the finite-difference step is the dtype's default (the cube root
of its machine epsilon). The figure is the relative error |g_fd - g_exact| / |g_exact|, the
median over 5 seeds; the same is given for autograd itself in that dtype, which separates the
backend's error from the dtype's rounding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.data import noisy_domains
from bilevel.functional import trainable_params
from bilevel.solvers import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int  # noqa: E402

ACT = {"tanh": nn.Tanh, "gelu": nn.GELU}


def problem(seed: int, activation: str):
    data = noisy_domains(per_domain=128, meta_size=64, test_size=8, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 64), ACT[activation](), nn.Linear(64, 64), ACT[activation](), nn.Linear(64, 4)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = data.train["x"].double(), data.train["y"]
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, data


def hypergradient(model, data, dtype, solver):
    m = model.to(dtype)
    train = {**data.train, "x": data.train["x"].to(dtype)}
    meta = {**data.meta, "x": data.meta["x"].to(dtype)}
    per_example = lambda o, b: F.cross_entropy(
        o.float() if dtype == torch.bfloat16 else o, b["y"], reduction="none"
    )  # noqa: E731,E501
    mean_ce = lambda o, b: F.cross_entropy(o.float() if dtype == torch.bfloat16 else o, b["y"])  # noqa: E731
    weights = DomainWeights(data.names, init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    return bilevel.hypergradient(
        solver,
        make_per_domain_loss(m, train, per_example, 4),
        make_outer_loss(m, meta, mean_ce),
        trainable_params(m),
        weights,
        0.1,
    ).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=5)
    args = parser.parse_args()
    print("| activation | solver | dtype | finite differences, rel. error | autograd, rel. error |")
    print("|---|---|---|---|---|")
    for activation in ACT:
        for name, opts in [("first_order", {}), ("cg(5)", {"iters": 5, "damping": 0.1})]:
            kind = name.split("(")[0]
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                fd, ad = [], []
                for seed in range(args.seeds):
                    model, data = problem(seed, activation)
                    exact = hypergradient(model, data, torch.float64, build(kind, **opts))
                    approx = hypergradient(
                        model, data, dtype, build(kind, products="finite_difference", **opts)
                    )
                    same = hypergradient(model, data, dtype, build(kind, **opts))
                    fd.append(((approx - exact).norm() / exact.norm()).item())
                    ad.append(((same - exact).norm() / exact.norm()).item())
                print(
                    f"| {activation} | {name} | {str(dtype).split('.')[1]} | "
                    f"{statistics.median(fd):.1e} | {statistics.median(ad):.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
