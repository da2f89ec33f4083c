"""FSDP2 sharding on 2 CPU ranks (gloo): the same weights as DDP, ranks that agree, an exact
resume from sharded checkpoints, and the combinations it refuses."""

import pytest

from tests.helpers import cli, read_summary, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# a smooth activation: finite-difference Hessian products see the kinks of a ReLU
COMMON = [
    "experiment=tiny",
    "model.activation=gelu",
    "trainer.steps=40",
    "trainer.log_every=20",
    "device=cpu",
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, extra in {
        "ddp": [],
        "ddp_fd": ["solver.products=finite_difference"],
        "fsdp": ["trainer.strategy=fsdp", "solver.products=finite_difference"],
    }.items():
        torchrun(*COMMON, *extra, f"hydra.run.dir={root / name}")
        out[name] = read_summary(root / name)
    out["root"] = root
    return out


def max_diff(a, b):
    return max(abs(a["weights"][k] - b["weights"][k]) for k in a["weights"])


def test_fsdp_learns_the_same_weights_as_ddp(runs):
    fsdp = runs["fsdp"]
    assert fsdp["strategy"] == "fsdp" and fsdp["world_size"] == 2 and fsdp["ranks_agree"]
    assert runs["ddp"]["strategy"] == "ddp" and runs["ddp"]["ranks_agree"]
    # the same products on sharded vs replicated parameters: the same numbers up to rounding
    assert max_diff(fsdp, runs["ddp_fd"]) < 1e-4
    # against DDP's exact autograd products (taken one step earlier, from the kept graph)
    assert max_diff(fsdp, runs["ddp"]) < 5e-3


def test_fsdp_holds_half_the_parameters_per_rank(runs):
    fsdp = runs["fsdp"]
    total, per_rank = fsdp["parameter_elements"], fsdp["parameter_elements_per_rank"]
    assert total == runs["ddp"]["parameter_elements"] == runs["ddp"]["parameter_elements_per_rank"]
    assert abs(per_rank - total / 2) <= 16


def test_fsdp_resume_equals_an_uninterrupted_run(runs):
    # a warm-started solver: its kept solution is sharded like the parameters and saved per rank
    root = runs["root"]
    extra = [
        "trainer.strategy=fsdp",
        "solver=neumann",
        "solver.iters=1",
        "solver.warm_start=true",
        "solver.products=finite_difference",
    ]
    torchrun(*COMMON, *extra, f"hydra.run.dir={root / 'whole'}")
    part = root / "part"
    torchrun(*COMMON, *extra, "trainer.steps=20", f"hydra.run.dir={part}")
    assert (part / "checkpoints" / "last.pt").exists()
    assert list((part / "checkpoints").glob("shards-20/method-rank1.pt"))
    torchrun(f"resume={part}", "trainer.steps=40")
    assert read_summary(part)["weights"] == read_summary(root / "whole")["weights"]


def test_fsdp_with_cg_runs(tmp_path):
    """Also: batch sizes that the 2 ranks cannot split evenly are said in the first lines
    (each rank draws batch_size // 2 rows: 33 trained on 32 in all, silently); SGD with
    momentum and weight decay, which the fused kernel (off under FSDP) used to be asked to
    skip on the device ("Expected grad_scale and found_inf to be None")."""
    extra = ["trainer.strategy=fsdp", "solver=cg", "solver.iters=3"]
    extra += ["+trainer.inner_optimizer.momentum=0.9", "+trainer.inner_optimizer.weight_decay=0.01"]
    extra += ["trainer.batch_size=33", "trainer.meta_batch_size=9"]
    torchrun(*COMMON, *extra, "solver.products=finite_difference", f"hydra.run.dir={tmp_path}")
    summary = read_summary(tmp_path)
    assert summary["skipped_steps"] == 0 and summary["ranks_agree"]
    uneven = [n for n in summary["notes"] if "is not a multiple of the 2 ranks" in n]
    assert uneven == [
        "trainer.batch_size=33 is not a multiple of the 2 ranks: each rank draws 16 rows, "
        "32 in all",
        "trainer.meta_batch_size=9 is not a multiple of the 2 ranks: each rank draws 4 rows, "
        "8 in all",
    ]


def test_a_batch_smaller_than_the_ranks_is_one_line():
    """It left every rank without rows: the sampler's ValueError on each rank."""
    from bilevel import TrainerConfig
    from bilevel.errors import ConfigError
    from bilevel.trainer.checks import check_batch_sizes

    with pytest.raises(ConfigError, match="^trainer.batch_size: 3 is smaller than the 4 ranks"):
        check_batch_sizes(TrainerConfig(batch_size=3), 4)
    check_batch_sizes(TrainerConfig(batch_size=4), 4)


@pytest.mark.parametrize(
    "args,field",
    [
        (["solver=unrolled"], "solver"),
        (["solver=cg"], "solver.products"),
        ([], "solver.products"),
    ],
)
def test_fsdp_refuses_what_cannot_run_sharded(tmp_path, args, field):
    proc = cli("experiment=tiny", "trainer.strategy=fsdp", *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bilevel: error: {field}")


def test_doge_with_finite_differences_may_run_sharded():
    """DoGE has no solve step of its own (its first_order inside has): it was refused under
    fsdp even with solver.products=finite_difference."""
    from bilevel.errors import ConfigError
    from bilevel.methods.checks import check_fsdp_solver
    from bilevel.solvers import build

    check_fsdp_solver(build("doge", products="finite_difference"))
    with pytest.raises(ConfigError, match="^solver.products: .*'doge' has products='autograd'"):
        check_fsdp_solver(build("doge"))

    class OnlyDomainGrad:  # a user's solver: products, but nothing to run on the shards
        name, products = "mine", "finite_difference"

        def domain_grad(self, *args, **kwargs): ...

    with pytest.raises(ConfigError, match="^solver: 'mine' has no solve step"):
        check_fsdp_solver(OnlyDomainGrad(), hypergradient=True)
