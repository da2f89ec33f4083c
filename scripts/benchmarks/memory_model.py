"""Per-GPU memory of bilevel training, on paper: models of 0.5B / 8B / 32B parameters under ddp
and fsdp (2, 8, 64 GPUs), for each solver and product backend.

    python scripts/benchmarks/memory_model.py                 # the tables (seconds)
    # also MiniLM-L6 measured vs predicted (hf extra)
    python scripts/benchmarks/memory_model.py --check

The model (all figures in bytes, P parameters, N ranks sharing them under fsdp, 1 under ddp):

* training state: fp32 master parameters 4P/N, fp32 gradients 4P/N, Adam moments 8P/N; under
  fsdp also the bf16 copy of the two blocks gathered at a time, 2 * 2P/L;
* activations A (not sharded: each rank's own micro-batch of b sequences of s tokens): per layer
  s*b*h*(34 + 5*a*s/h) bytes in bf16 (Korthikanti et al., 2022; the 5*a*s/h term is the
  attention matrix, which fused attention (SDPA / flash) never materializes), plus the logits,
  6*s*b*V (bf16 logits and their fp32 copy for the loss);
* what each hypergradient adds, with v = 4P/N a parameter-shaped fp32 vector:

  ============================ ===========================================================
  autograd first_order / sama  the kept gradient graph (create_graph) and its double backward:
                               +9A (measured on MiniLM: the kept graph holds about 6.4 A, one
                               double backward about 3 A more), the meta gradient (+v); sama
                               also the last gradient and its preconditioner (+2v)
  autograd cg(k), neumann(k)   +9A, the kept graph's gradient, and r, p, H p (cg) or g, v, H v
                               (neumann): +4v (+1v for a warm start's kept solution)
  finite_difference first_ord. the meta gradient and the saved parameters (exact restore): +2v
  finite_difference cg, neum.  r, p, the two gradients of H p, the saved parameters: +5v
                               (the training step's activations are freed by then)
  unrolled(T) (ddp only)       T steps' graphs: +T*(A + v)
  scalebio                     a second copy of the trainable state: +4P/N +4P/N +8P/N
  ============================ ===========================================================

Checked where it can be: ``--check`` measures MiniLM-L6 (all parameters, fp32, CPU) with the
profiler and compares a plain gradient and the solvers' peaks with the same formulas. Two
constants come from measurements rather than first principles: the activations A are fitted to
the measured plain gradient (the published 34 counts bf16 training with dropout masks), and the
9A of autograd's kept graph comes from MiniLM with eager attention; the finite-difference terms
are pure vector counting, and the check shows whether that counting holds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int  # noqa: E402

GB = 1e9


@dataclass
class Arch:
    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    vocab: int


MODELS = [
    Arch("0.5B (Qwen2.5-0.5B shape)", 0.494e9, 24, 896, 14, 151936),
    Arch("8B (Llama-3.1-8B shape)", 8.03e9, 32, 4096, 32, 128256),
    Arch("32B (Qwen2.5-32B shape)", 32.8e9, 64, 5120, 40, 152064),
]

SOLVERS = [
    ("first_order", "autograd"),
    ("first_order", "finite_difference"),
    ("cg(5)", "autograd"),
    ("cg(5)", "finite_difference"),
    ("neumann warm(1)", "autograd"),
    ("neumann warm(1)", "finite_difference"),
    ("unrolled(5)", "autograd"),
    ("scalebio", "none"),
]
LABEL = {"autograd": "autograd", "finite_difference": "FD", "none": "(no products)"}


def activations(
    m: Arch, tokens: int, seq: int, fused: bool, constant: float = 34.0, dtype: int = 2
) -> float:
    """Activation bytes of one micro-batch of ``tokens`` tokens (sequences of ``seq``)."""
    attention = 0.0 if fused else 5 * m.heads * seq / m.hidden
    per_layer = tokens * m.hidden * (constant + attention) * dtype / 2
    logits = 6 * tokens * m.vocab * dtype / 2
    return m.layers * per_layer + logits


def per_gpu(
    m: Arch,
    strategy: str,
    n: int,
    solver: str,
    products: str,
    tokens: int,
    seq: int,
    fused: bool,
) -> float | None:
    """Bytes on one GPU, or ``None`` for a combination the library refuses."""
    shards = n if strategy == "fsdp" else 1
    if strategy == "fsdp" and (products == "autograd" or solver.startswith("unrolled")):
        return None
    if fused and products == "autograd":
        return None
    v = 4 * m.params / shards
    state = 16 * m.params / shards
    if strategy == "fsdp":
        state += 2 * 2 * m.params / m.layers
    act = activations(m, tokens, seq, fused)
    extra = 0.0
    if solver == "first_order":
        extra = 9 * act + v if products == "autograd" else 2 * v
    elif solver.startswith("cg") or solver.startswith("neumann"):
        warm = 1 if "warm" in solver else 0
        extra = 9 * act + (4 + warm) * v if products == "autograd" else (5 + warm) * v
    elif solver.startswith("unrolled"):
        extra = 5 * (act + v)
    elif solver == "scalebio":
        extra = 16 * m.params / shards
    return state + act + extra


def tables(tokens: int, seq: int) -> str:
    out = [
        f"Per-GPU memory (GB) with bf16 compute, fp32 master weights, Adam; a micro-batch of "
        f"{tokens // seq} x {seq} tokens per GPU; eager attention for autograd products, fused "
        f"(SDPA/flash) for finite differences. '-' = refused (fsdp needs finite differences; "
        f"fused kernels need them too). Bold: fits one 80 GB GPU.\n"
    ]
    for m in MODELS:
        header = ["strategy, GPUs", "training only"] + [f"{s} {LABEL[p]}" for s, p in SOLVERS]
        rows = []
        for strategy, n in [("ddp", 1), ("fsdp", 2), ("fsdp", 8), ("fsdp", 64)]:
            base = per_gpu(m, strategy, n, "none", "finite_difference", tokens, seq, True)
            label = "ddp, any number" if strategy == "ddp" else f"{strategy}, {n}"
            cells = [label, _fmt(base)]
            for solver, products in SOLVERS:
                fused = products == "finite_difference" or products == "none"
                cells.append(_fmt(per_gpu(m, strategy, n, solver, products, tokens, seq, fused)))
            rows.append(cells)
        out.append(f"**{m.name}** ({m.params / 1e9:.1f}B parameters)\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value / GB:.1f}"
    return f"**{text}**" if value <= 80 * GB else text


def check() -> str:
    """MiniLM-L6 measured (profiler, CPU, fp32) against the formulas."""
    import torch
    from bench_hf import batches, mean_ce, peak_mb, per_example  # noqa: E402

    import bilevel
    from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
    from bilevel.functional import forward_batch, trainable_params
    from bilevel.models.hf import HFClassifier
    from bilevel.solvers import build

    torch.set_num_threads(2)
    args = argparse.Namespace(random=False, batch=8)
    cpu = torch.device("cpu")
    train, meta, _ = batches(args, cpu)
    model = HFClassifier(num_labels=6, trainable="all")
    params = [p for p in model.parameters() if p.requires_grad]
    p_count = sum(p.numel() for p in params)
    v = 4 * p_count
    weights = DomainWeights(["a", "b", "c"])

    def hyper(solver):
        return lambda: bilevel.hypergradient(
            solver,
            make_per_domain_loss(model, train, per_example, 3),
            make_outer_loss(model, meta, mean_ce),
            trainable_params(model),
            weights,
        )

    plain = peak_mb(
        lambda: torch.autograd.grad(
            mean_ce(forward_batch(model, train), train), params, allow_unused=True
        ),
        cpu,
    )
    act = plain * 2**20 - v  # the plain gradient is the gradient vector plus the activations
    predicted = {
        "first_order autograd": act + v,  # the public API's forward mode: no kept graph
        "cg(5) autograd": act + 9 * act + 4 * v,  # kept graph + double backward, 4 vectors
        "first_order finite_difference": 2 * v + act / 2,
        "cg(5) finite_difference": 5 * v + act,
    }
    solvers = {
        "first_order autograd": build("first_order"),
        "cg(5) autograd": build("cg", iters=5),
        "first_order finite_difference": build("first_order", products="finite_difference"),
        "cg(5) finite_difference": build("cg", iters=5, products="finite_difference"),
    }
    rows = [
        f"MiniLM-L6, all {p_count:,} parameters (v = {v / 2**20:.0f} MB), batch 24 x 32 tokens, "
        f"fp32, CPU; activations fitted from the plain gradient: {act / 2**20:.0f} MB\n",
        "| call | measured MB | predicted MB | predicted / measured |",
        "|---|---|---|---|",
        f"| plain gradient | {plain:.0f} | {plain:.0f} (fit) | 1.00 |",
    ]
    for name, solver in solvers.items():
        measured = peak_mb(hyper(solver), cpu)
        guess = predicted[name] / 2**20
        rows.append(f"| {name} | {measured:.0f} | {guess:.0f} | {guess / measured:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=positive_int, default=2048)
    parser.add_argument(
        "--sequences", type=positive_int, default=1, help="sequences per GPU micro-batch"
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    print(tables(args.seq * args.sequences, args.seq))
    if args.check:
        print(check())


if __name__ == "__main__":
    main()
