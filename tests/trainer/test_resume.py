"""Exact continuation: a run stopped by a signal, killed, or extended ends bit-identical to one
left alone."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from bilevel.logging import read_jsonl
from tests.helpers import REPO, cli, cli_batch, read_summary

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
    ["weights=instance_table"],  # the table and LazyAdam's per-row moments and counts
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
