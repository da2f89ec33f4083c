"""Every outer method in the trainer on a GPU, with host synchronizations made errors.

    python scripts/benchmarks/gpu_check.py                 # needs CUDA
    python scripts/benchmarks/gpu_check.py --device cpu    # the same runs without the sync check

The claim checked: between log events, the training loop never reads a value back to the host
(no .item(), no data-dependent shapes, no blocking copies). Each method trains the compute-size
benchmark problem (K=4, MLP 20-1024-2, batch 2048) for a few warm-up windows, then for
``--windows`` windows under ``torch.cuda.set_sync_debug_mode("error")``, which turns any
synchronizing CUDA call into an exception; the table says which methods passed and how fast
they ran against the fixed-weight loop on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arguments import nonnegative_int, positive_int  # noqa: E402

from bilevel import BilevelTrainer, DomainWeights, TrainerConfig  # noqa: E402
from bilevel.data import noisy_domains  # noqa: E402
from bilevel.losses import cross_entropy, per_example_cross_entropy  # noqa: E402
from bilevel.models import MLP  # noqa: E402
from bilevel.solvers import build  # noqa: E402
from bilevel.weights.meta_weight_net import MetaWeightNet  # noqa: E402

METHODS = [
    ("fixed weights", "first_order", {}, {"learn_weights": False}),
    ("first_order", "first_order", {}, {}),
    ("first_order fd", "first_order", {"products": "finite_difference"}, {}),
    ("unrolled(5)", "unrolled", {"steps": 5}, {}),
    ("neumann(5)", "neumann", {"iters": 5}, {}),
    ("cg(5)", "cg", {"iters": 5}, {}),
    ("cg(5) fd", "cg", {"iters": 5, "products": "finite_difference"}, {}),
    ("neumann warm(1)", "neumann", {"iters": 1, "warm_start": True}, {}),
    ("cg warm(1)", "cg", {"iters": 1, "warm_start": True}, {}),
    ("cg(5), H from another batch", "cg", {"iters": 5}, {"hessian_batch": "independent"}),
    ("sama (Adam)", "sama", {}, {}),
    ("doge", "doge", {}, {}),
    ("scalebio", "scalebio", {}, {}),
    ("odm", "odm", {}, {}),
    ("loss_reweighting", "loss_reweighting", {}, {}),
    ("meta_weight_net", "first_order", {}, {}),
    ("sampling=weights", "first_order", {}, {"sampling": "weights"}),
]


def trainer(name, solver, opts, extra, device):
    data = noisy_domains(
        names=["d0", "d1", "d2", "d3"],
        label_noise=[0.0, 0.0, 0.4, 0.4],
        per_domain=4096,
        meta_size=256,
        test_size=256,
        dim=20,
        num_classes=2,
        seed=0,
    )
    torch.manual_seed(0)
    model = MLP(20, 2, hidden=1024).to(device)
    weights = (
        MetaWeightNet(data.names, device=device)
        if name == "meta_weight_net"
        else DomainWeights(data.names, device=device)
    )
    inner = None
    if name.startswith("sama"):
        inner = lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)  # noqa: E731
    config = TrainerConfig(
        steps=10**9, outer_every=5, batch_size=2048, log_every=10**9, progress=False, **extra
    )
    return BilevelTrainer(
        model,
        weights,
        build(solver, **opts),
        per_example_cross_entropy,
        cross_entropy,
        data,
        config,
        inner_optimizer=inner,
        device=device,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--windows", type=positive_int, default=30)
    parser.add_argument("--warmup", type=nonnegative_int, default=5)
    parser.add_argument("--only", default="", help="comma-separated method names to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{where}, torch {torch.__version__}; {args.windows} windows of 5 inner steps each\n")
    print("| method | no host sync in the loop | ms / window | × fixed weights |")
    print("|---|---|---|---|")
    base = None
    wanted = [m for m in args.only.split(",") if m]
    for name, solver, opts, extra in METHODS:
        if wanted and name not in wanted:
            continue
        t = trainer(name, solver, opts, extra, device)
        for _ in range(args.warmup):
            t.step_window()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        verdict = "yes" if cuda else "(not checked: CPU)"
        start = time.perf_counter()
        try:
            for _ in range(args.windows):
                t.step_window()
        except RuntimeError as err:
            verdict = "NO: " + str(err).strip().splitlines()[0][:90]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.windows * 1e3
        base = base or ms
        print(f"| {name} | {verdict} | {ms:.2f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
