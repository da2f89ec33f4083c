"""Exact resume after SIGKILL, non-finite guard, input validation, torchrun."""

import functools
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from bilevel import BilevelTrainer, DomainWeights, TrainerConfig
from bilevel.data import DomainData, noisy_domains
from bilevel.hypergradient import chain_through_parametrization
from bilevel.logging import read_jsonl
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from bilevel.trainer import NonFiniteError
from tests.integration.helpers import REPO, cli, cli_batch, read_summary, torchrun

# Big enough that 100 steps take a few seconds, so the kill lands mid-run.
RESUME_ARGS = [
    "experiment=tiny",
    "trainer.steps=100",
    "trainer.checkpoint_every=20",
    "trainer.log_every=10",
    "model.hidden=[512,512]",
    "trainer.batch_size=512",
    "data.per_domain=512",
    "seed=3",
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """``solver -> run directory`` of the uninterrupted RESUME_ARGS run (made once per solver)."""
    runs: dict = {}

    def get(solver: str):
        if solver not in runs:
            out = tmp_path_factory.mktemp("reference") / solver
            proc = cli(*RESUME_ARGS, f"solver={solver}", f"hydra.run.dir={out}")
            assert proc.returncode == 0, proc.stderr
            runs[solver] = out
        return runs[solver]

    return get


@pytest.mark.slow
def test_ctrl_c_or_sigterm_stops_at_a_window_with_a_checkpoint_and_resumes_exactly(
    tmp_path, reference_run
):
    reference = reference_run("first_order")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        stopped = tmp_path / sig.name
        child = subprocess.Popen(
            [sys.executable, "-m", "bilevel", *RESUME_ARGS, "solver=first_order"]
            + [f"hydra.run.dir={stopped}"]
            + ["trainer.progress=false"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # a test run in the background inherits an ignored SIGINT, which the run (rightly)
            # keeps ignored: give the child the terminal's default disposition
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        metrics = stopped / "metrics.jsonl"
        deadline = time.time() + 120
        while (
            child.poll() is None
            and time.time() < deadline
            and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
        ):
            time.sleep(0.005)
        assert child.poll() is None, "the run ended before it could be stopped"
        child.send_signal(sig)
        out, err = child.communicate(timeout=120)
        assert child.returncode == code, out + err
        line = [x for x in (out + err).splitlines() if "stopped by" in x]
        assert len(line) == 1 and f"stopped by {sig.name} at step" in line[0], out + err
        step = int(line[0].split(" at step ")[1].split(";")[0])
        assert 0 < step < 100 and f"resume={stopped}" in line[0]
        assert not (stopped / "summary.json").exists()
        assert torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["step"] == step
    stopped = [tmp_path / sig.name for sig in (signal.SIGINT, signal.SIGTERM)]
    for proc in cli_batch([[f"resume={run}"] for run in stopped]):  # one process for both
        assert proc.returncode == 0, proc.stderr
    for run in stopped:
        assert read_summary(run)["weights"] == read_summary(reference)["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["first_order", "unrolled"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, solver, reference_run):
    args = [*RESUME_ARGS, f"solver={solver}"]
    reference = reference_run(solver)

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bilevel",
            *args,
            f"hydra.run.dir={killed}",
            "trainer.progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / "checkpoints" / "last.pt"

    def checkpoint_step():  # the file is replaced atomically: a read never sees half of it
        return torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else -1

    deadline = time.time() + 120
    while checkpoint_step() < 20 and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "summary.json").exists()
    step_at_kill = checkpoint_step()
    assert 20 <= step_at_kill < 100

    # resume=<run dir> alone continues the same run, in its own directory
    proc = cli(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr
    ref, res = read_summary(reference), read_summary(killed)
    assert res["weights"] == ref["weights"]  # bit-identical floats
    assert res["meta_loss"] == ref["meta_loss"] and res["test"] == ref["test"]
    weights = lambda d: [r["weights"] for r in read_jsonl(d / "metrics.jsonl") if "weights" in r]  # noqa: E731
    assert weights(killed) == weights(reference)


@pytest.mark.parametrize(
    "solver",
    [
        ["solver=cg"],
        # the warm-started solution is part of the checkpoint: the resumed run continues it
        ["solver=cg", "solver.iters=1", "solver.warm_start=true"],
        ["solver=neumann", "solver.iters=1", "solver.warm_start=true"],
    ],
)
def test_extending_a_finished_run_equals_one_long_run(run_cli, tmp_path, solver):
    long, _ = run_cli("experiment=tiny", "trainer.steps=40", *solver, out=tmp_path / "long")
    run_cli("experiment=tiny", "trainer.steps=20", *solver, out=tmp_path / "short")
    resumed, _ = run_cli(
        "experiment=tiny",
        "trainer.steps=40",
        *solver,
        f"resume={tmp_path / 'short'}",
        out=tmp_path / "short",  # continue in its own directory (another one would branch)
    )
    assert resumed["weights"] == long["weights"]
    assert resumed["resumed_from"] == str(tmp_path / "short")
    assert read_summary(tmp_path / "short")["steps"] == 40


# -- non-finite guard ---------------------------------------------------------------------------


class NaNForDomain:
    """Per-example cross-entropy, NaN for one domain's examples on chosen calls."""

    def __init__(self, domain, calls):
        self.domain, self.calls, self.n = domain, set(calls), 0

    def __call__(self, output, batch):
        self.n += 1
        loss = F.cross_entropy(output, batch["y"], reduction="none")
        if self.n in self.calls:
            loss = torch.where(batch["domain"] == self.domain, torch.nan, loss)
        return loss


def make_trainer(inner_loss, tmp_path=None, **config):
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    model = MLP(**data.model_kwargs, hidden=16)
    cfg = TrainerConfig(
        **{
            "steps": 40,
            "outer_every": 5,
            "batch_size": 32,
            "log_every": 5,
            "progress": False,
            **config,
        }
    )
    return BilevelTrainer(
        model,
        DomainWeights(data.names),
        build("first_order"),
        inner_loss,
        cross_entropy,
        data,
        cfg,
        run_dir=tmp_path,
    )


def test_nan_in_one_domain_is_skipped_and_reported(tmp_path):
    # first_order takes its hypergradient from the last inner step's graph: the inner loss is
    # called once per inner step (after one call that checks its shape when the trainer is
    # built), so call 13 is the 2nd step of the 3rd window.
    trainer = make_trainer(NaNForDomain(domain=1, calls={13}), tmp_path)
    summary = trainer.fit()
    assert summary["steps"] == 40
    assert summary["skipped_inner"] == 1 and summary["skipped_outer"] == 0
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(list(summary["weights"].values()))))
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1


def test_nan_in_the_last_step_of_a_window_skips_it_and_the_outer_update(tmp_path):
    trainer = make_trainer(NaNForDomain(domain=3, calls={11}), tmp_path)
    summary = trainer.fit()
    assert summary["skipped_inner"] == 1 and summary["skipped_outer"] == 1


def test_skipped_inner_step_leaves_model_unchanged():
    trainer = make_trainer(NaNForDomain(domain=2, calls={2}))  # call 1 checks the shape
    before = [p.detach().clone() for p in trainer.module.parameters()]
    state = (
        {k: v.clone() for k, v in trainer.inner_opt.state_dict()["state"].items()}
        if trainer.inner_opt.state_dict()["state"]
        else {}
    )
    trainer.loop.inner_step(trainer.loop.next_batch())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))
    assert trainer.skips.inner.item() == 1 and state == {}
    trainer.loop.inner_step(trainer.loop.next_batch())  # call 3 is finite: it moves
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))


def test_non_finite_hypergradient_keeps_weights(tmp_path):
    calls = {"n": 0}

    def nan_meta(output, batch):
        calls["n"] += 1
        loss = F.cross_entropy(output, batch["y"])
        return loss * torch.nan if calls["n"] == 1 else loss

    trainer = make_trainer(per_example_cross_entropy, tmp_path, steps=5, log_every=5)
    trainer.outer_loss = nan_meta
    before = trainer.weights.logits.detach().clone()
    trainer._window(5)
    assert torch.equal(trainer.weights.logits.detach(), before)
    assert trainer.skips.outer.item() == 1


def test_too_many_consecutive_skips_stop_the_run_with_a_checkpoint(tmp_path):
    trainer = make_trainer(
        NaNForDomain(domain=0, calls=range(5, 10_000)), tmp_path, max_skipped=8, checkpoint_every=0
    )
    with pytest.raises(NonFiniteError, match="consecutive inner steps were skipped"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "summary.json").exists()


# -- input validation ---------------------------------------------------------------------------


def test_resume_without_checkpoint_and_with_other_names(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    proc = cli("experiment=tiny", f"resume={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "bilevel: error: resume:" in proc.stderr
    assert "not a bilevel run directory" in proc.stderr
    run_cli("experiment=tiny", "trainer.steps=10", out=tmp_path / "first")
    (tmp_path / "first" / "checkpoints" / "last.pt").unlink()
    proc = cli("experiment=tiny", f"resume={tmp_path / 'first'}")
    assert proc.returncode == 2 and "bilevel: error: resume: no checkpoint" in proc.stderr
    run_cli("experiment=tiny", "trainer.steps=10", out=tmp_path / "second")
    proc = cli(
        "experiment=tiny",
        "data.names=[a,b,c,d]",
        f"resume={tmp_path / 'second'}",
        f"hydra.run.dir={tmp_path / 'r2'}",
    )
    assert proc.returncode == 2, proc.stderr
    assert "resume" in proc.stderr and "data.names" in proc.stderr


def test_nonfinite_stop_exits_3_with_message(tmp_path):
    (tmp_path / "nanloss.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "def loss(output, batch):\n"
        "    return F.cross_entropy(output, batch['y'], reduction='none') * torch.nan\n"
    )
    proc = cli(
        "experiment=tiny",
        "inner_loss._target_=nanloss.loss",
        "trainer.max_skipped=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 3, proc.stderr
    assert "consecutive inner steps were skipped" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# -- torchrun ---------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    out = tmp_path / "ddp"
    scratch = tmp_path / "tmp"  # the ranks' temporary folder: rank 1's Hydra folder goes there
    scratch.mkdir()
    torchrun(
        "experiment=noisy_domains",
        "trainer.steps=40",
        "device=cpu",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
        env={"TMPDIR": str(scratch)},
    )
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert summary["steps"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "tmp"]  # rank 1: nothing here
    assert not list(scratch.glob("bilevel-rank*"))  # and its temporary folder is gone


@pytest.mark.parametrize("solver", ["scalebio", "odm"])
def test_methods_of_their_own_rule_keep_the_weights_equal_on_every_rank(tmp_path, solver):
    """ScaleBiO's penalty gradient and ODM's reward estimates came from each rank's own
    batches: the weights drifted apart between ranks (summary's ranks_agree false, exit 0)."""
    torchrun(
        "experiment=tiny", f"solver={solver}", "trainer.progress=false", f"hydra.run.dir={tmp_path}"
    )
    summary = read_summary(tmp_path)
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True


LOCAL_METHOD = """
import torch
import torch.distributed as dist
from bilevel.methods.base import OuterUpdate


class PerRank:  # a user's method with a bug: each rank sets its own weights
    name, uses_meta, uses_outer_optimizer = "per_rank", False, False

    def setup(self, loop):
        return []

    def window(self, loop, n, update):
        for _ in range(n):
            loop.inner_step(loop.next_batch())
        if not update:
            return None
        scores = torch.arange(len(loop.w), dtype=loop.w.dtype) * (1.0 + dist.get_rank())
        return OuterUpdate(values=torch.softmax(scores, 0))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
"""


def test_weights_that_drift_apart_between_ranks_are_said_at_the_first_log_event(tmp_path):
    (tmp_path / "per_rank.py").write_text(LOCAL_METHOD)
    out = tmp_path / "run"
    torchrun(
        "experiment=tiny",
        "solver=custom",
        "solver._target_=per_rank.PerRank",
        "trainer.log_every=10",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    summary = read_summary(out)
    assert summary["ranks_agree"] is False
    assert [n for n in summary["notes"] if "differ between ranks at step 10" in n]


def test_data_builder_must_return_domain_data():
    with pytest.raises(Exception, match="no training examples"):
        d = noisy_domains(per_domain=4, meta_size=4, test_size=4)
        DomainData(d.names, {k: v[:4] for k, v in d.train.items()}, d.meta).validate()


# -- the trainer's hypergradient is the exact derivative through its last inner step ------------


def captured_outer_grad(solver, inner_optimizer=None, config=None, **opts):
    """The gradient the trainer hands its outer optimizer after one window of one inner step,
    and what it needs to check it: theta before the step, the batch, the meta set. Everything
    is float64, so the comparison is tight."""
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].double()
    model = MLP(**data.model_kwargs, hidden=16).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names, init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64),
        build(solver, **opts),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(
            **{"steps": 1, "outer_every": 1, "batch_size": 32, "progress": False} | (config or {})
        ),
        inner_optimizer=inner_optimizer,
    )
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = trainer.train_sampler.state_dict()
    batch = trainer.loop.next_batch()
    trainer.train_sampler.load_state_dict(state)
    captured = {}
    original = trainer._apply

    def capture(update):
        captured["grad"] = chain_through_parametrization(trainer.weights, update.grad)
        original(update)

    trainer._apply = capture
    trainer.step_window()
    return captured["grad"], theta0, batch, trainer


def two_groups(params):
    """SGD whose first layer steps at 0.3 and the rest at 0.1 (a head/body split)."""
    params = list(params)
    return torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:]}], lr=0.1)


@pytest.mark.parametrize("groups", [False, True], ids=["one lr", "two groups"])
@pytest.mark.parametrize("solver,opts", [("first_order", {}), ("unrolled", {"steps": 1})])
def test_trainer_hypergradient_is_exact_through_the_last_step(solver, opts, groups):
    # with parameter groups, each tensor steps at its own group's lr: the derivative through
    # that step (first_order took the first group's lr for every tensor, and unrolled stepped
    # every tensor at it, off the optimizer's trajectory)
    optimizer = two_groups if groups else None
    grad, theta0, batch, trainer = captured_outer_grad(solver, optimizer, **opts)
    model, k = trainer.module, 4
    lrs = [0.3, 0.3, 0.1, 0.1] if groups else [0.1] * 4
    names = list(theta0)
    leaves = [theta0[n].clone().requires_grad_(True) for n in names]
    logits = trainer.weights.logits.detach().clone()
    # the weights before the outer step: recompute from the initial values
    logits = (
        DomainWeights(trainer.names, init=[0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
        .logits.detach()
        .clone()
        .requires_grad_(True)
    )
    w = torch.softmax(logits, 0)

    def per_domain(params):
        out = torch.func.functional_call(model, dict(zip(names, params)), (batch["x"],))
        losses = F.cross_entropy(out, batch["y"], reduction="none")
        return torch.stack([losses[batch["domain"] == i].mean() for i in range(k)])

    g = torch.autograd.grad((w * per_domain(leaves)).sum(), leaves, create_graph=True)
    theta1 = [p - lr * gi for p, gi, lr in zip(leaves, g, lrs, strict=True)]
    meta = trainer.meta_sampler.columns
    out = torch.func.functional_call(model, dict(zip(names, theta1)), (meta["x"],))
    expected = torch.autograd.grad(F.cross_entropy(out, meta["y"]), logits)[0]
    # float64 throughout: agreement to rounding, while reading theta_T instead of theta_{T-1}
    # in the kept graph would differ at the level of lr * grad
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "opts,config",
    [
        ({}, {}),  # the last inner step's graph
        ({"products": "finite_difference"}, {}),  # the module itself
        ({}, {"sampling": "weights"}),  # the public API on a uniform batch
        ({}, {"hessian_batch": "independent"}),
    ],
    ids=["graph", "module", "api", "independent"],
)
def test_the_inner_optimizers_weight_decay_is_damping_of_the_implicit_solve(
    opts, config, monkeypatch
):
    """SGD's weight_decay lambda makes the inner objective L_w + lambda/2 |theta|^2: every path
    of the trainer solves with H + lambda I, as cg with damping=lambda on the loss alone does."""
    import bilevel.methods.hypergradient as method

    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.5)
    with_decay, *_ = captured_outer_grad("cg", sgd, config, iters=3, **opts)
    monkeypatch.setattr(method, "l2_decay", lambda *args: None)
    as_damping, *_ = captured_outer_grad("cg", sgd, config, iters=3, damping=0.5, **opts)
    ignored, *_ = captured_outer_grad("cg", sgd, config, iters=3, **opts)
    torch.testing.assert_close(with_decay, as_damping, rtol=1e-9, atol=1e-13)
    assert (with_decay - ignored).norm() > 0.01 * ignored.norm()


# Every outer method and the settings that keep state of their own (a warm solution, ScaleBiO's
# second copy, a bandit, a meta-weight net, a schedule, a sampler's epoch, a second batch).
STATEFUL = [
    ["solver=first_order"],
    ["solver=unrolled", "solver.steps=3"],
    ["solver=neumann", "solver.warm_start=true", "solver.iters=1"],
    ["solver=cg", "solver.warm_start=true", "solver.iters=1", "solver.damping=0.1"],
    ["solver=cg", "solver.products=finite_difference", "trainer.hessian_batch=independent"],
    ["solver=sama", "trainer/inner_optimizer=adam"],
    ["solver=scalebio"],
    ["solver=odm"],
    ["solver=doge"],
    ["solver=loss_reweighting"],
    ["weights=meta_weight_net"],
    ["trainer.sampling=weights", "trainer.meta_batch_size=8"],
    ["trainer.sampling=size", "trainer/inner_scheduler=cosine"],
]


@pytest.mark.parametrize("overrides", STATEFUL, ids=lambda o: " ".join(o))
def test_a_checkpoint_continues_every_method_exactly(overrides, tmp_path):
    """Half a run, its state through a checkpoint file (loaded weights_only), then the other
    half in a fresh trainer, built after the global RNG was moved: bit-equal weights and
    model to the run that was never interrupted. A method whose state the checkpoint missed
    would continue from another point, silently."""
    from hydra import compose, initialize_config_dir

    from bilevel.cli import config_dir, make_trainer, seed_everything
    from bilevel.strategies.distributed import DistContext

    def trainer():
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=tiny", *overrides])
        seed_everything(cfg.seed)
        return make_trainer(cfg, DistContext(), torch.device("cpu"), None, overrides)

    def windows(t, n):
        for _ in range(n):
            t.step_window()
        return [
            t.weights.logits.detach().clone(),
            *(p.detach().clone() for p in t.module.parameters()),
        ]

    reference = windows(trainer(), 8)
    first = trainer()
    windows(first, 4)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(12345)  # what the restore must overwrite
    second = trainer()
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = windows(second, 4)
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed, strict=True))


FULL_DISK = """
import errno, sys, torch
from bilevel import cli

real_save, calls = torch.save, []

def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk part-way
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["bilevel-run", *sys.argv[1:]]
cli.main()
"""


def test_a_full_disk_is_one_line_and_the_run_resumes_from_its_last_checkpoint(tmp_path):
    """A write that failed (disk full, quota) ended in a traceback wall from deep inside
    torch.save. It is one line naming the file, exit 1; the checkpoint keeps its previous
    version, and the run continues from it to the same end as a run never interrupted."""
    out = tmp_path / "run"
    args = ["experiment=tiny", "trainer.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"bilevel: error: cannot write {out / 'checkpoints' / 'last.pt'}: No space left on "
        f"device; the run's files keep their last complete versions: free space (or fix the "
        f"folder), then continue with resume={out}"
    ]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]  # no temp file
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    resumed, straight = cli_batch(
        [[f"resume={out}"], [*args, f"hydra.run.dir={tmp_path / 'straight'}"]]
    )
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr
    assert read_summary(out)["weights"] == read_summary(tmp_path / "straight")["weights"]


OOM_MODEL = """
import torch
from bilevel.models import MLP


class NarrowOOM(MLP):
    \"\"\"An MLP that runs out of memory at its 30th forward pass when 8 units wide.\"\"\"

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 30 and self.net[0].out_features == 8:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                "79.11 GiB of which 1.20 GiB is free."
            )
        return super().forward(x)
"""


def test_out_of_memory_is_one_line_and_a_sweep_goes_on(tmp_path):
    """Running out of memory (the commonest end of a run on a GPU) was a traceback; it is one
    line with torch's own first sentence and what shrinks this library's footprint, exit 1. In a
    sweep it ends only the job whose sizes did not fit."""
    (tmp_path / "oom_model.py").write_text(OOM_MODEL)
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "experiment=tiny",
        "model._target_=oom_model.NarrowOOM",
        "model.hidden=[16],[8]",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr
    line = (
        "bilevel: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower "
        "trainer.batch_size (or set trainer.meta_batch_size), use solver.products="
        "finite_difference (no kept double-backward graph), trainer.strategy=fsdp under "
        "torchrun (shards the model)"
    )
    assert line in proc.stderr.splitlines() and "Traceback" not in proc.stderr
    assert read_summary(sweep / "0")["steps"] == 40  # the job that fitted finished
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and ",error," in rows[2] and "out of memory" in rows[2]
