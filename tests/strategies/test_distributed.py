"""Hypergradients averaged across 2 gloo ranks equal the single-process ones on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss
from bilevel.functional import trainable_params
from bilevel.solvers import build
from bilevel.strategies.distributed import DistContext

SOLVERS = {"first_order": {}, "cg": {"iters": 5, "damping": 1.0}, "neumann": {"iters": 5}}


def problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    k, per_rank_per_domain = 3, 4
    # rank r holds rows [r::2]; every rank gets the same number of rows of each domain
    domain = torch.arange(k).repeat_interleave(2 * per_rank_per_domain)
    train = {
        "x": torch.randn(len(domain), 4, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (len(domain),), generator=g),
        "domain": domain,
    }
    meta = {
        "x": torch.randn(10, 4, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (10,), generator=g),
    }
    return (
        model,
        train,
        meta,
        DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64),
    )


def per_example(out, batch):
    return F.cross_entropy(out, batch["y"], reduction="none")


def mean_ce(out, batch):
    return F.cross_entropy(out, batch["y"])


def shard(columns, rank):
    return {k: v[rank::2] for k, v in columns.items()}


def worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2)
    model, train, meta, w = problem()
    out = {}
    for name, opts in SOLVERS.items():
        out[name] = bilevel.hypergradient(
            build(name, **opts),
            make_per_domain_loss(model, shard(train, rank), per_example, 3),
            make_outer_loss(model, shard(meta, rank), mean_ce),
            trainable_params(model),
            w,
            reduce=ctx.reduce,
        )
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.distributed
def test_reduced_hypergradients_equal_single_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    model, train, meta, w = problem()
    for name, opts in SOLVERS.items():
        full = bilevel.hypergradient(
            build(name, **opts),
            make_per_domain_loss(model, train, per_example, 3),
            make_outer_loss(model, meta, mean_ce),
            trainable_params(model),
            w,
        )
        torch.testing.assert_close(results[0][name], full, msg=name)
        assert torch.equal(results[0][name], results[1][name])  # identical on both ranks


def test_what_fsdp_refuses_is_decided_in_one_place():
    """The trainer (trainer.strategy=fsdp) and the hypergradient method (a sharded strategy
    passed in) ask the same check: products that need double backward, and a solver without
    the shard-local solve step, are refused; methods without products are left to themselves."""
    from bilevel.errors import ConfigError
    from bilevel.methods.checks import check_fsdp_solver
    from bilevel.methods.odm import ODM

    check_fsdp_solver(build("cg", products="finite_difference"))
    check_fsdp_solver(build("first_order", products="finite_difference"), hypergradient=True)
    check_fsdp_solver(ODM())
    with pytest.raises(
        ConfigError, match="^solver.products: .*solver 'cg' has products='autograd'"
    ):
        check_fsdp_solver(build("cg"))
    with pytest.raises(ConfigError, match="^solver: unrolled differentiates"):
        check_fsdp_solver(build("unrolled"))

    class OwnSolver:  # the Solver protocol alone: a call, no products, no solve step
        name = "own"

        def __call__(self, *args, **kwargs):
            raise AssertionError("never called")

    check_fsdp_solver(OwnSolver())  # the trainer cannot tell what it is: the method decides
    with pytest.raises(ConfigError, match="solver 'own' has products='autograd'"):
        check_fsdp_solver(OwnSolver(), hypergradient=True)
