"""Benchmark: bilevel against higher, TorchOpt and Betty on one domain-reweighting problem.

    python scripts/benchmarks/bench.py  # both sizes, all methods, memory (~10 min, 2 cores)
    python scripts/benchmarks/bench.py --size tiny         # the overhead-bound problem only
    python scripts/benchmarks/bench.py --scaling  # time/memory vs unroll T, K and model size
    python scripts/benchmarks/bench.py --quick             # smoke run (seconds)

The problem (``peers.Problem``): K domains of synthetic 2-class data, the last ``noisy`` of them
with 40% flipped labels, an MLP 20-H-2, T inner SGD steps of ``per_domain`` examples per domain
per outer step, a clean meta set of 256 examples, Adam on softmax logits for the outer update.
``tiny`` is K=4, H=64, 64 examples per domain (per-call overhead dominates); ``compute`` is
H=1024, 512 examples per domain.

Timing: every method keeps its own state and all methods are stepped round-robin, ``--block``
outer steps at a time, so that each sees the same machine load; a figure is the median over
``--rounds`` blocks after ``--warmup`` outer steps. Ratios are taken within this one run.
Peak memory is measured separately, one subprocess per method: the largest amount of tensor
memory held above the state at the start of an outer step (the profiler's allocation records
on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). Weights and accuracies are read after
the timed steps (all methods have taken the same number of outer steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import nonnegative_int, positive_int  # noqa: E402
from peers import Problem, Unavailable, copy_problem, make_data, registry  # noqa: E402

from bilevel.data.evaluate import classification_metrics  # noqa: E402

SIZES = {
    "tiny": {"hidden": 64, "per_domain": 64},
    "compute": {"hidden": 1024, "per_domain": 512},
}


def build(name: str, p: Problem, data):
    try:
        return registry(p)[name](p, data), None
    except Unavailable as err:
        return None, str(err)
    except Exception as err:  # a peer that breaks on this torch is reported, not dropped
        return None, f"{type(err).__name__}: {err}"


def time_methods(p: Problem, names: list[str], rounds: int, block: int, warmup: int):
    data = make_data(p)
    methods, results = {}, {}
    for name in names:
        method, reason = build(name, p, data)
        if method is None:
            results[name] = {"error": reason}
            continue
        try:
            for _ in range(warmup):
                method.outer_step()
        except Exception as err:  # noqa: BLE001
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        methods[name] = method
    samples: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            for _ in range(block):
                method.outer_step()
            if p.device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / block)
    for name, method in methods.items():
        model = method.final_model()
        meta = classification_metrics(model, method.meta, method.device)
        test = classification_metrics(
            model, {k: v.to(method.device) for k, v in data.test.items()}, method.device
        )
        results[name] = {
            "label": method.name,
            "ms": statistics.median(samples[name]) * 1e3,
            "weights": method.final_weights(),
            "meta_acc": meta["accuracy"],
            "test_acc": test["accuracy"],
            "outer_steps": warmup + rounds * block,
        }
    return results


def child(name: str, p: Problem, steps: int) -> dict:
    """Peak memory of one method above its resident state, in a fresh process.

    On the CPU the profiler's allocation records are summed in time order (RSS would mostly
    show the allocator's caching); on a GPU, ``max_memory_allocated``.
    """
    from torch.profiler import ProfilerActivity, profile

    data = make_data(p)
    method, reason = build(name, p, data)
    if method is None:
        return {"error": reason}
    for _ in range(2):
        method.outer_step()
    if p.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            method.outer_step()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            method.outer_step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return {"peak_mb": peak / 2**20}


def measure_memory(p: Problem, names: list[str], steps: int) -> dict[str, dict]:
    out = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--problem",
            json.dumps(vars(p)),
            "--steps",
            str(steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        try:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return out


def fmt_weights(w: dict[str, float]) -> str:
    return " ".join(f"{v:.3f}" for v in w.values())


def table(p: Problem, res: dict, mem: dict) -> str:
    plain = res.get("fixed_plain", {}).get("ms", float("nan"))
    ours_fixed = res.get("fixed_ours", {}).get("ms", float("nan"))
    lines = [
        f"| method | ms / outer step | × plain fixed | × bilevel fixed | peak MB | weights "
        f"({', '.join(p.names)}) | meta acc | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error']} |  |  |  |  |  |  |")
            continue
        m = mem.get(name, {})
        peak = f"{m['peak_mb']:.1f}" if "peak_mb" in m else m.get("error", "–")
        lines.append(
            f"| {r['label']} | {r['ms']:.2f} | {r['ms'] / plain:.2f} | {r['ms'] / ours_fixed:.2f} "
            f"| {peak} | {fmt_weights(r['weights'])} | {r['meta_acc']:.3f} | {r['test_acc']:.3f} |"
        )
    return "\n".join(lines)


def goals(res: dict) -> str:
    """The acceptance ratios of the benchmark issue, computed from this run."""
    ms = {k: v["ms"] for k, v in res.items() if "ms" in v}
    out = []

    def ratio(a, b):
        return ms[a] / ms[b] if a in ms and b in ms else float("nan")

    noisy = res.get("ours_first_order", {}).get("weights", {})
    out.append(
        f"- first_order / 5 fixed-weight steps: {ratio('ours_first_order', 'fixed_plain'):.2f} "
        f"vs the plain PyTorch loop, {ratio('ours_first_order', 'fixed_ours'):.2f} vs bilevel's "
        f"own fixed-weight loop (goal <= 1.15); noisy weights "
        f"{', '.join(f'{v:.4f}' for v in list(noisy.values())[-2:])} (goal < 0.01)"
    )
    out.append(
        f"- unrolled / higher: {ratio('ours_unrolled', 'higher_unrolled'):.2f} (goal <= 0.8)"
    )
    peers = [k for k in ("betty_neumann", "betty_cg", "torchopt_neumann", "torchopt_cg") if k in ms]
    if peers:
        fastest = min(peers, key=ms.get)
        for ours in ("ours_neumann", "ours_cg"):
            out.append(
                f"- {ours} / fastest peer implicit ({fastest}): {ratio(ours, fastest):.2f} "
                "(goal <= 0.6)"
            )
    if "api_first_order" in ms:
        out.append(
            f"- bilevel.hypergradient first_order in a user's own loop: "
            f"{ratio('api_first_order', 'fixed_plain'):.2f}× the plain fixed-weight loop, "
            f"{ratio('api_first_order', 'ours_first_order'):.2f}× the trainer's first_order, "
            f"{ratio('api_first_order', 'betty_darts'):.2f}× Betty darts"
        )
    for warm in (
        "ours_neumann_warm",
        "ours_neumann_simultaneous",
        "ours_cg_warm",
        "api_neumann_warm",
    ):
        if warm in ms:
            out.append(
                f"- {warm}: {ratio(warm, 'fixed_plain'):.2f}× the plain fixed-weight loop "
                f"(goal <= 1.5 on compute), {ratio(warm, 'ours_first_order'):.2f}× first_order "
                f"(goal <= 1.3 on tiny), {ratio(warm, 'betty_neumann'):.2f}× Betty neumann(5) "
                "(goal <= 0.6 on tiny)"
            )
    return "\n".join(out)


def scaling(base: Problem, rounds: int, block: int, warmup: int, memory: bool) -> str:
    names = ["fixed_plain", "ours_first_order", "ours_unrolled", "ours_cg", "higher_unrolled"]
    sections = []
    for label, key, values in [
        ("unroll length T", "unroll", [1, 5, 20]),
        ("domains K (batch fixed at 256)", "k", [4, 16, 64]),
        ("hidden width H", "hidden", [64, 256, 1024]),
    ]:
        rows = [
            f"| {label} | "
            + " | ".join(f"{n} ms" for n in names)
            + (" | " + " | ".join(f"{n} MB" for n in names) if memory else "")
            + " |",
            "|" + "---|" * (1 + len(names) * (2 if memory else 1)),
        ]
        for v in values:
            changes = {key: v}
            if key == "k":  # same total batch (256) and model: only the split into domains changes
                changes.update(noisy=v // 2, per_domain=max(1, 256 // v))
            p = copy_problem(base, **changes)
            res = time_methods(p, names, rounds, block, warmup)
            mem = measure_memory(p, names, steps=5) if memory else {}
            cells = [f"{res[n]['ms']:.2f}" if "ms" in res[n] else "–" for n in names]
            if memory:
                cells += [f"{mem[n].get('peak_mb', float('nan')):.1f}" for n in names]
            rows.append(f"| {v} | " + " | ".join(cells) + " |")
        sections.append("\n".join(rows))
    # overhead of learning weights with outer_every = 10
    p = copy_problem(base, unroll=10)
    res = time_methods(p, ["fixed_plain", "fixed_ours", "ours_first_order"], rounds, block, warmup)
    sections.append(
        "Overhead of learning weights, first_order, outer_every=10: "
        f"{res['ours_first_order']['ms'] / res['fixed_plain']['ms']:.2f}× the plain fixed-weight "
        f"loop, {res['ours_first_order']['ms'] / res['fixed_ours']['ms']:.2f}× bilevel's "
        "fixed-weight loop (goal <= 1.2)"
    )
    return "\n\n".join(sections)


def warm_accuracy(p: Problem, steps: int, warmup: int) -> str:
    """Along a run of each warm-started solver, the cosine between its hypergradient and a cold
    cg(20) solve of the same linear system (same point, same batch, same products)."""
    from peers import Ours

    from bilevel.solvers import build as build_solver

    data = make_data(p)
    rows = [
        "| method | outer steps | cosine to cold cg(20): median | 10th percentile | "
        "final noisy weight | test acc |",
        "|---|---|---|---|---|---|",
    ]
    for label, name, opts in [
        ("cg warm(1)", "cg", {"iters": 1, "warm_start": True}),
        ("neumann warm(1)", "neumann", {"iters": 1, "alpha": p.inner_lr, "warm_start": True}),
        (
            "neumann warm(1), simultaneous",
            "neumann",
            {"iters": 1, "alpha": p.inner_lr, "warm_start": True, "simultaneous": True},
        ),
        ("cg(5) cold", "cg", {"iters": p.iters}),
        ("first_order", "first_order", {}),
    ]:
        method = Ours(p, data, name, **opts)
        reference = build_solver("cg", iters=20)
        solver = method.trainer.solver
        cosines: list[float] = []
        original = type(solver).solve

        def solve(
            products,
            g_outer,
            inner_lr,
            _orig=original,
            _solver=solver,
            _ref=reference,
            _out=cosines,
        ):
            # solve() consumes g_outer (cg turns it into its residual, in place): one copy each
            cold = _ref.solve(products, [t.clone() for t in g_outer], inner_lr)
            got = _orig(_solver, products, g_outer, inner_lr)
            _out.append(torch.nn.functional.cosine_similarity(got, cold, dim=0).item())
            return got

        object.__setattr__(solver, "solve", solve)
        for _ in range(warmup + steps):
            method.outer_step()
        measured = sorted(cosines[warmup:])
        median = statistics.median(measured)
        p10 = measured[max(0, int(0.1 * len(measured)) - 1)]
        weights = method.final_weights()
        noisy = sum(list(weights.values())[-p.noisy :])
        test = classification_metrics(
            method.final_model(),
            {k: v.to(method.device) for k, v in data.test.items()},
            method.device,
        )
        rows.append(
            f"| {label} | {steps} | {median:.3f} | {p10:.3f} | {noisy:.4f} | "
            f"{test['accuracy']:.3f} |"
        )
    return "\n".join(rows)


def gpu_throughput(steps: int = 300) -> str:
    if not torch.cuda.is_available():
        return "No GPU on this machine: the sync-free GPU check was not run."
    from peers import FixedPlain, Ours

    p = Problem(device="cuda", hidden=1024, per_domain=512)
    data = make_data(p)
    plain, ours = FixedPlain(p, data), Ours(p, data, "first_order")
    for m in (plain, ours):
        for _ in range(10):
            m.outer_step()
    torch.cuda.synchronize()
    times = {}
    for label, m in (("plain", plain), ("ours", ours)):
        torch.cuda.set_sync_debug_mode("error" if label == "ours" else "default")
        start = time.perf_counter()
        for _ in range(steps):
            m.outer_step()
        torch.cuda.synchronize()
        times[label] = time.perf_counter() - start
        torch.cuda.set_sync_debug_mode("default")
    return (
        f"GPU ({torch.cuda.get_device_name()}): bilevel first_order ran {steps} outer steps "
        f"under set_sync_debug_mode('error') without a host sync; throughput "
        f"{times['plain'] / times['ours']:.2f}× the plain fixed-weight loop's."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "compute", "both"], default="both")
    parser.add_argument("--methods", default="", help="comma-separated subset of method keys")
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--block", type=positive_int, default=10)
    parser.add_argument("--warmup", type=nonnegative_int, default=20)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--scaling", action="store_true", help="also the scaling tables")
    parser.add_argument("--only-scaling", action="store_true", help="the scaling tables alone")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny size, few steps, no memory")
    parser.add_argument("--warm", action="store_true", help="also: warm-start accuracy along a run")
    parser.add_argument("--out", help="also write the report to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=positive_int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch imports
    logging.disable(logging.INFO)  # Betty's per-problem banners

    if args.child:
        print(json.dumps(child(args.child, Problem(**json.loads(args.problem)), args.steps)))
        return
    if args.quick:
        args.size, args.rounds, args.block, args.warmup, args.memory = "tiny", 2, 2, 2, False
    known = list(registry(Problem()))
    names = [n.strip() for n in args.methods.split(",") if n.strip()] or known
    unknown = [n for n in names if n not in known]
    if unknown:  # was a table row "not run: KeyError" after minutes of the other methods
        parser.error(f"--methods: unknown {', '.join(unknown)}; the methods: {', '.join(known)}")
    report = [
        f"Machine: {os.cpu_count()} CPU cores, {args.threads} torch threads, device {args.device}, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}.",
    ]
    sizes = ["tiny", "compute"] if args.size == "both" else [args.size]
    if args.only_scaling:
        sizes, args.scaling = [], True
    for size in sizes:
        p = Problem(device=args.device, **SIZES[size])
        res = time_methods(p, names, args.rounds, args.block, args.warmup)
        mem = measure_memory(p, names, steps=10) if args.memory else {}
        report += [
            f"\n### {size}: K={p.k}, MLP {p.dim}-{p.hidden}-{p.classes}, T={p.unroll} inner steps "
            f"of {p.per_domain} examples per domain, {p.iters} Neumann/CG iterations "
            f"({res.get('fixed_plain', {}).get('outer_steps', 0)} outer steps per method)\n",
            table(p, res, mem),
            "",
            goals(res),
        ]
        print("\n".join(report[-4:]), flush=True)
    if args.warm:
        for size in sizes:
            p = Problem(device=args.device, **SIZES[size])
            report += [
                f"\n### Warm starts ({size}): cosine to a cold cg(20) solve at the same point\n",
                warm_accuracy(p, steps=60 if args.quick else 200, warmup=args.warmup),
            ]
            print("\n".join(report[-2:]), flush=True)
    if args.scaling:
        base = Problem(device=args.device, **SIZES["tiny"])
        report += [
            "\n### Scaling (tiny problem, one parameter changed at a time)\n",
            scaling(base, max(2, args.rounds // 3), args.block, args.warmup, args.memory),
        ]
        print("\n".join(report[-2:]), flush=True)
    report.append("\n" + gpu_throughput())
    print(report[-1])
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
