"""Smoke runs of the benchmark scripts (they never run as benchmarks inside the test suite)."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


def run_script(*args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.mark.slow
def test_bench_quick_runs_and_reports_every_method():
    proc = run_script(
        "scripts/benchmarks/bench.py",
        "--quick",
        "--methods",
        "fixed_plain,fixed_ours,ours_first_order,ours_unrolled,ours_neumann,ours_cg,"
        "higher_unrolled,betty_darts,torchopt_unrolled",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in [
        "fixed weights, plain PyTorch loop",
        "bilevel first_order",
        "bilevel unrolled",
        "bilevel neumann",
        "bilevel cg",
        "higher unrolled",
    ]:
        assert f"| {label} |" in out
    # a peer is either measured or listed with the reason it could not run
    for key, label in [
        ("betty_darts", "Betty darts"),
        ("torchopt_unrolled", "TorchOpt unrolled (MetaSGD)"),
    ]:
        assert f"| {label} |" in out or f"| {key} | not run:" in out
    assert "unrolled / higher:" in out


def test_bench_hypergrad_quick_runs():
    proc = run_script("scripts/benchmarks/bench_hypergrad.py", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for solver in ["first_order", "unrolled(5)", "neumann(10)", "cg(10)"]:
        assert f"| {solver} |" in proc.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--methods", "nope"], "--methods: 'nope' is not a method of digits; its methods: "),
        (["--methods", ","], "--methods: no label is not a method"),
        (["--seeds", "-1"], "argument --seeds: must be an integer in [0, 2**32), got '-1'"),
    ],
)
def test_the_study_runner_refuses_bad_arguments_before_writing(tmp_path, args, said):
    """An unknown method label ran nothing and then wrote an empty results.json over the
    study's (its 1,760 lines), then failed with StopIteration; a negative seed stopped with a
    traceback from the first run."""
    proc = run_script("scripts/experiments.py", "digits", "--out", str(tmp_path), *args)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_study_runner_reuses_only_runs_made_with_the_same_settings(tmp_path, capsys):
    """--reuse took any finished run in the folder: a --quick run of 4 steps (same folder)
    became the full study's result, silently."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("study_runner", REPO / "scripts/experiments.py")
    runner = importlib.util.module_from_spec(spec)
    sys.modules["study_runner"] = runner  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(runner)
    finally:
        del sys.modules["study_runner"]
    out = tmp_path / "seed0"
    out.mkdir()
    assert not runner.reusable(out, ["seed=0"], 3000)  # nothing finished there
    (out / "summary.json").write_text(json.dumps({"steps": 4}))
    assert not runner.reusable(out, ["seed=0"], 3000)  # an older quick run
    assert "was made with other settings" in capsys.readouterr().out
    (out / "summary.json").write_text(json.dumps({"steps": 3000}))
    assert runner.reusable(out, ["seed=0"], 3000)  # an older run of the same length
    (out / runner.RUNNER_FILE).write_text(json.dumps(["seed=0", "trainer.steps=4"]))
    assert not runner.reusable(out, ["seed=0"], 3000)  # its overrides were kept: they differ
    (out / runner.RUNNER_FILE).write_text(json.dumps(["seed=0"]))
    assert runner.reusable(out, ["seed=0"], 3000)
    # the same overrides, but a preset or default edited since: the run recorded its settings
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "trainer": {"steps": 3000, "outer_every": 1, "progress": False},
            "weights": {"init": "from:experiments/x/mixture.yaml"},
        }
    )
    recorded = {
        "seed": 0,
        "trainer": {"steps": 3000, "outer_every": 5, "progress": True},
        "weights": {"init": [0.5, 0.5]},  # what the run read from the file
        "only_then": 1,
    }
    (out / "config.json").write_text(json.dumps(recorded))
    assert not runner.reusable(out, ["seed=0"], 3000, cfg)
    assert "trainer.outer_every: 5 then, 1 now" in capsys.readouterr().out
    recorded["trainer"]["outer_every"] = 1  # progress, a from: reference and extra keys: alike
    (out / "config.json").write_text(json.dumps(recorded))
    assert runner.reusable(out, ["seed=0"], 3000, cfg)


def test_mixture_transfer_ranks_larger_runs_of_a_known_law(tmp_path):
    """Proxies and 'larger' runs follow one mixing law up to a change of scale (the larger
    model's loss is lower everywhere): a fit on the proxies ranks the larger runs as measured
    and picks the best of them."""
    import numpy as np

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]

    def write(stem, n, scale, shift):
        x = rng.dirichlet([1.0, 1.0, 1.0], n)
        y = scale * np.exp(x @ np.array([-2.0, -1.0, 0.5])) + shift  # the data mixing law's form
        mix = tmp_path / f"{stem}_mix.csv"
        met = tmp_path / f"{stem}_loss.csv"
        mix.write_text(
            "id,"
            + ",".join(names)
            + "\n"
            + "".join(f"{i}," + ",".join(f"{v:.6f}" for v in row) + "\n" for i, row in enumerate(x))
        )
        met.write_text("id,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(y)))
        return mix, met

    mix, met = write("proxies", 60, 1.0, 2.0)
    big_mix, big_met = write("large", 20, 0.6, 1.0)

    def transfer(*args):
        return run_script(
            "scripts/benchmarks/mixture_transfer.py",
            *("--mixtures", str(mix), "--metrics", str(met), "--check", f"{big_mix}:{big_met}"),
            *args,
        )

    proc = transfer("--target", "loss", "--models", "law")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| law |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0.95 and float(cells[2]) > 0.95
    assert cells[3] == "1 of 20"
    bad = transfer("--target", "nope")
    assert bad.returncode == 2 and "'nope' is not a column" in bad.stderr
