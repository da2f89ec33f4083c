"""Time each hypergradient solver in units of one plain gradient on the same batch, and vs K.

    python scripts/benchmarks/bench_hypergrad.py  # full table (about a minute on 2 CPU cores)
    python scripts/benchmarks/bench_hypergrad.py --quick    # smoke run

A "plain gradient" is forward + backward of the mean per-example loss on the same batch with the
same model (``torch.autograd.grad``). Solver calls and plain gradients are timed interleaved
(one of each per repeat) so that both see the same machine load; each figure is a median over
``--repeats`` after warm-up. The K sweep keeps the batch and the model fixed and only changes how
many domains the examples are split into, so any growth with K is the solver's own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel.functional import make_outer_loss, make_per_domain_loss, trainable_params
from bilevel.solvers import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int  # noqa: E402

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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def interleaved(fn, reference, repeats: int, block: int = 5) -> tuple[float, float]:
    """Medians of ``fn`` and ``reference`` timed in alternating blocks of ``block`` calls.

    The first call of every block only warms the caches and is not counted, so neither side
    pays for the other's cache footprint while both see the same machine load.
    """
    a: list[float] = []
    b: list[float] = []
    while len(a) < repeats:
        for fn_, out in ((fn, a), (reference, b)):
            fn_()
            out.extend(_timed(fn_) for _ in range(block - 1))
    return statistics.median(a), statistics.median(b)


def problem(k: int, batch: int, dim: int, hidden: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    train = {
        "x": torch.randn(batch, dim, generator=g),
        "y": torch.randint(0, classes, (batch,), generator=g),
        "domain": torch.arange(batch) % k,
    }
    meta = {
        "x": torch.randn(batch // 4, dim, generator=g),
        "y": torch.randint(0, classes, (batch // 4,), generator=g),
    }
    weights = bilevel.DomainWeights([f"d{i}" for i in range(k)])
    return model, train, meta, weights


def plain_gradient(model: nn.Module, train: dict):
    """The unit of time: one forward + backward of the mean loss on the training batch."""
    params = list(model.parameters())

    def run():
        torch.autograd.grad(F.cross_entropy(model(train["x"]), train["y"]), params)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive_int, default=1024)
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--classes", type=positive_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.hidden, args.repeats = 64, 16, 2
    torch.set_num_threads(args.threads)

    ks = (4, 16, 64)
    print(
        f"MLP {args.dim}-{args.hidden}-{args.hidden}-{args.classes}, batch {args.batch}, "
        f"torch {torch.__version__}, {args.threads} threads; median of {args.repeats}"
    )
    model, train, _, _ = problem(4, args.batch, args.dim, args.hidden, args.classes)
    print(
        f"plain gradient: {median_time(plain_gradient(model, train), args.repeats) * 1e3:.2f} ms\n"
    )
    header = "| solver | x plain grad (K=4) | " + " | ".join(f"ms K={k}" for k in ks)
    header += " | K=64 / K=4 |"
    print(header)
    print("|" + "---|" * (len(ks) + 3))
    for label, opts in SOLVERS.items():
        name = label.split("(")[0]
        solver = build(name, **opts)
        times, units = {}, {}
        for k in ks:
            model, train, meta, weights = problem(
                k, args.batch, args.dim, args.hidden, args.classes
            )
            per_domain = make_per_domain_loss(model, train, per_example_ce, k)
            outer = make_outer_loss(model, meta, mean_ce)
            theta = trainable_params(model)
            call = partial(bilevel.hypergradient, solver, per_domain, outer, theta, weights, 0.1)
            for _ in range(3):  # warm-up: allocator, caches
                call()
            times[k], units[k] = interleaved(call, plain_gradient(model, train), args.repeats)
        cells = " | ".join(f"{times[k] * 1e3:.2f}" for k in ks)
        print(f"| {label} | {times[4] / units[4]:.2f} | {cells} | {times[64] / times[4]:.2f} |")


if __name__ == "__main__":
    main()
