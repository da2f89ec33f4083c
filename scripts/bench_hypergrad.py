"""Time each hypergradient solver in units of one plain gradient on the same batch, and vs K.

    python scripts/bench_hypergrad.py            # full table (about a minute on 2 CPU cores)
    python scripts/bench_hypergrad.py --quick    # smoke run

A "plain gradient" is forward + backward of the mean per-example loss on the same batch with the
same model (``torch.autograd.grad``). Every time is the median of ``--repeats`` timed calls after
warm-up. The K sweep keeps the batch and the model fixed and only changes how many domains the
examples are split into, so any growth with K is the solver's own.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel.functional import make_outer_loss, make_per_domain_loss, trainable_params
from bilevel.solvers import build

SOLVERS = {
    "first_order": {},
    "unrolled(5)": {"steps": 5},
    "neumann(10)": {"iters": 10, "alpha": 0.05},
    "cg(10)": {"iters": 10},
}


def per_example_ce(output, batch):
    return F.cross_entropy(output, batch["y"], reduction="none")


def mean_ce(output, batch):
    return F.cross_entropy(output, batch["y"])


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def problem(k: int, batch: int, dim: int, hidden: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    train = {
        "x": torch.randn(batch, dim, generator=g),
        "y": torch.randint(0, classes, (batch,), generator=g),
        "domain": torch.arange(batch) % k,
    }
    meta = {"x": torch.randn(batch // 4, dim, generator=g),
            "y": torch.randint(0, classes, (batch // 4,), generator=g)}
    weights = bilevel.DomainWeights([f"d{i}" for i in range(k)])
    return model, train, meta, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.hidden, args.repeats = 64, 16, 2
    torch.set_num_threads(args.threads)

    ks = (4, 16, 64)
    print(f"MLP {args.dim}-{args.hidden}-{args.hidden}-{args.classes}, batch {args.batch}, "
          f"torch {torch.__version__}, {args.threads} threads; median of {args.repeats}")
    model, train, _, _ = problem(4, args.batch, args.dim, args.hidden, args.classes)
    params = [p for p in model.parameters()]

    def plain_grad():
        loss = F.cross_entropy(model(train["x"]), train["y"])
        torch.autograd.grad(loss, params)

    unit = median_time(plain_grad, args.repeats)
    print(f"plain gradient: {unit * 1e3:.2f} ms\n")
    header = f"| solver | x plain grad (K=4) | " + " | ".join(f"ms K={k}" for k in ks)
    header += " | K=64 / K=4 |"
    print(header)
    print("|" + "---|" * (len(ks) + 3))
    for label, opts in SOLVERS.items():
        name = label.split("(")[0]
        solver = build(name, **opts)
        times = {}
        for k in ks:
            model, train, meta, weights = problem(k, args.batch, args.dim, args.hidden,
                                                  args.classes)
            per_domain = make_per_domain_loss(model, train, per_example_ce, k)
            outer = make_outer_loss(model, meta, mean_ce)
            theta = trainable_params(model)
            times[k] = median_time(
                lambda: bilevel.hypergradient(solver, per_domain, outer, theta, weights, 0.1),
                args.repeats,
            )
        cells = " | ".join(f"{times[k] * 1e3:.2f}" for k in ks)
        print(f"| {label} | {times[4] / unit:.2f} | {cells} | {times[64] / times[4]:.2f} |")


if __name__ == "__main__":
    main()
