"""Smoke runs of the benchmark scripts (they never run as benchmarks inside the test suite)."""

import subprocess
import sys

import pytest

from tests.integration.helpers import REPO


def run_script(*args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.mark.slow
def test_bench_quick_runs_and_reports_every_method():
    proc = run_script(
        "scripts/bench.py",
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
    proc = run_script("scripts/bench_hypergrad.py", "--quick")
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
