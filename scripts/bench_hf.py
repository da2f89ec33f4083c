"""Time and peak memory of one hypergradient on MiniLM-L6 with model.trainable=all|lora|head.

    python scripts/bench_hf.py             # needs the [hf] extra; about 2 minutes on 2 cores
    python scripts/bench_hf.py --quick

The batch: 3 domains x 8 chatterbot-corpus utterances of 32 tokens, a meta batch of 12. For each
trainable subset it reports the trainable parameter count, a plain gradient (forward + backward,
the unit), a first_order and a cg(5) hypergradient through ``bilevel.hypergradient``: median
wall time over ``--repeats`` calls after one warm-up, and the peak tensor memory held above the
starting state during one call (the profiler's allocation records, as in scripts/bench.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.data.columns import take
from bilevel.functional import forward_batch, trainable_params
from bilevel.models.hf import HFClassifier
from bilevel.solvers import build


def per_example(out, batch):
    return F.cross_entropy(out, batch["y"], reduction="none")


def mean_ce(out, batch):
    return F.cross_entropy(out, batch["y"])


def peak_mb(fn) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bilevel_experiments.text_domains.builders import text_domains

    data = text_domains(seed=0)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [
            torch.nonzero(data.train["domain"] == k).flatten()[torch.randperm(400, generator=g)[:8]]
            for k in range(3)
        ]
    )
    train = take(data.train, rows)
    meta = take(data.meta, torch.arange(12))
    weights = DomainWeights(data.names)
    solvers = {"first_order": build("first_order"), "cg(5)": build("cg", iters=5, damping=0.1)}
    subsets = ["lora", "head"] if args.quick else ["all", "lora", "head"]
    print(
        f"MiniLM-L6, batch 3 x 8 x 32 tokens, meta 12, torch {torch.__version__}, "
        f"{args.threads} threads; median of {args.repeats}\n"
    )
    print(
        "| trainable | parameters | plain grad s | plain grad MB | first_order s | "
        "first_order MB | cg(5) s | cg(5) MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for trainable in subsets:
        torch.manual_seed(0)
        model = HFClassifier(num_labels=6, trainable=trainable)
        cells = measure(model, train, meta, weights, solvers, args.repeats)
        print(
            f"| {trainable} | {model.trainable_count():,} | " + " | ".join(cells) + " |", flush=True
        )


def measure(model, train, meta, weights, solvers, repeats: int) -> list[str]:
    """Seconds and peak MB of a plain gradient and of each solver's hypergradient."""
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        torch.autograd.grad(mean_ce(forward_batch(model, train), train), params, allow_unused=True)

    calls = [plain]
    for solver in solvers.values():
        calls.append(
            partial(
                bilevel.hypergradient,
                solver,
                make_per_domain_loss(model, train, per_example, 3),
                make_outer_loss(model, meta, mean_ce),
                trainable_params(model),
                weights,
            )
        )
    return [cell for fn in calls for cell in (f"{median_s(fn, repeats):.3f}", f"{peak_mb(fn):.0f}")]


if __name__ == "__main__":
    main()
