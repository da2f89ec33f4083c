"""Time and peak memory of one hypergradient on MiniLM-L6: trainable subsets, attention kernels
(eager, SDPA) and product backends (autograd, finite differences).

    python scripts/benchmarks/bench_hf.py  # needs the [hf] extra; ~5 minutes on 2 cores
    python scripts/benchmarks/bench_hf.py --quick
    # a GPU: randomly initialized MiniLM-L6
    python scripts/benchmarks/bench_hf.py --random --device cuda

The batch: 3 domains x 8 chatterbot-corpus utterances of 32 tokens (``--random``: random tokens,
``--batch`` rows per domain), a meta batch of 12. For each configuration it reports a plain
gradient (forward + backward of the mean loss, the unit), a first_order and a cg(5)
hypergradient through ``bilevel.hypergradient``: median wall time over ``--repeats`` calls after
one warm-up, and the peak tensor memory held above the starting state during one call (the
profiler's allocation records on the CPU, ``max_memory_allocated`` on a GPU). Fused attention
(SDPA) has no double backward: its autograd rows are reported as not available.
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

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.data.columns import take, to_device
from bilevel.functional import forward_batch, trainable_params
from bilevel.models.hf import HFClassifier
from bilevel.solvers import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int  # noqa: E402


def per_example(out, batch):
    return F.cross_entropy(out, batch["y"], reduction="none")


def mean_ce(out, batch):
    return F.cross_entropy(out, batch["y"])


def peak_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def median_s(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_checkpoint(folder) -> str:
    """A randomly initialized BERT with MiniLM-L6's shape, saved as a local checkpoint."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return str(folder)


def batches(args, device):
    if args.random:
        g = torch.Generator().manual_seed(0)
        n, t = 3 * args.batch, 32

        def cols(rows, domains):
            return {
                "x": {
                    "input_ids": torch.randint(1000, 30000, (rows, t), generator=g),
                    "attention_mask": torch.ones(rows, t, dtype=torch.int64),
                },
                "y": torch.randint(0, 6, (rows,), generator=g),
                **({"domain": torch.arange(rows) % 3} if domains else {}),
            }

        return to_device(cols(n, True), device), to_device(cols(12, False), device), None
    from bilevel_experiments.text_domains.builders import text_domains

    data = text_domains(seed=0)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [
            torch.nonzero(data.train["domain"] == k).flatten()[
                torch.randperm(400, generator=g)[: args.batch]
            ]
            for k in range(3)
        ]
    )
    return (
        to_device(take(data.train, rows), device),
        to_device(take(data.meta, torch.arange(12)), device),
        None,
    )


def measure(model, train, meta, weights, solvers, repeats, device) -> list[str]:
    """Seconds and peak MB of a plain gradient and of each solver's hypergradient."""
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        torch.autograd.grad(mean_ce(forward_batch(model, train), train), params, allow_unused=True)

    cells = []
    calls = [plain] + [
        partial(
            bilevel.hypergradient,
            solver,
            make_per_domain_loss(model, train, per_example, 3),
            make_outer_loss(model, meta, mean_ce),
            trainable_params(model),
            weights,
        )
        for solver in solvers
    ]
    for fn in calls:
        try:
            cells += [f"{median_s(fn, repeats, device):.3f}", f"{peak_mb(fn, device):.0f}"]
        except (RuntimeError, NotImplementedError) as err:
            reason = (
                "no double backward"
                if "derivative" in str(err) or "backward" in str(err)
                else type(err).__name__
            )
            cells += [f"n/a ({reason})", "–"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=positive_int, default=8, help="rows per domain")
    parser.add_argument("--random", action="store_true", help="random MiniLM-sized weights")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = None
    if args.random:
        import tempfile

        path = random_checkpoint(tempfile.mkdtemp(prefix="minilm-random-"))
    train, meta, _ = batches(args, device)
    weights = DomainWeights(["a", "b", "c"], device=device)
    grid = [
        ("all", "eager", "autograd"),
        ("all", "eager", "finite_difference"),
        ("all", "sdpa", "finite_difference"),
        ("lora", "eager", "autograd"),
        ("lora", "sdpa", "finite_difference"),
        ("head", "eager", "autograd"),
    ]
    if args.quick:
        grid = [("lora", "eager", "autograd"), ("lora", "sdpa", "finite_difference")]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} CPU threads"
    print(
        f"MiniLM-L6{' (random weights)' if args.random else ''}, batch 3 x {args.batch} x 32 "
        f"tokens, meta 12, torch {torch.__version__}, {where}; median of {args.repeats}\n"
    )
    print(
        "| trainable | attention | products | parameters | plain grad s | plain grad MB | "
        "first_order s | first_order MB | cg(5) s | cg(5) MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for trainable, attention, products in grid:
        torch.manual_seed(0)
        model = HFClassifier(
            num_labels=6, path=path, trainable=trainable, attn_implementation=attention
        ).to(device)
        solvers = [
            build("first_order", products=products),
            build("cg", iters=5, damping=0.1, products=products),
        ]
        cells = measure(model, train, meta, weights, solvers, args.repeats, device)
        print(
            f"| {trainable} | {attention} | {products} | {model.trainable_count():,} | "
            + " | ".join(cells)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
