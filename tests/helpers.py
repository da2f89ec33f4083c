"""Helpers shared by the end-to-end tests."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, cwd=None, timeout=300):
    """Run ``python -m bilevel`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bilevel", *args, "trainer.progress=false"],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def torchrun(*args, env=None, timeout=300):
    """``torchrun --standalone --nproc_per_node=2 -m bilevel <args>`` (2 CPU ranks, one thread
    each); asserts that it exited 0 and returns the CompletedProcess."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "bilevel",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_summary(path):
    return json.loads((Path(path) / "summary.json").read_text())


_BATCH_DRIVER = """
import contextlib, io, json, sys, traceback
from bilevel import cli

cases, results = json.load(sys.stdin), []
for args in cases:
    sys.argv = ["bilevel-run", *args, "trainer.progress=false"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
with open(OUTPUT, "w") as f:
    json.dump(results, f)
"""


def cli_batch(cases, env=None, timeout=600, processes=1):
    """Run each argument list through bilevel's entry point, one after another in ONE fresh
    Python process: importing torch and Hydra is most of what a short run costs, so a table
    of bad inputs (each stopping before training) runs in seconds instead of minutes. Each
    case gets its own ``sys.argv``, captured stdout and stderr, and exit code; returns a list
    of ``CompletedProcess`` in the order of ``cases``. ``processes=2`` splits cases that do
    not depend on each other over two processes that run at the same time (2 cores)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    size = -(-len(cases) // processes)
    parts = [cases[i : i + size] for i in range(0, len(cases), size)]
    with tempfile.TemporaryDirectory() as scratch:
        children = []
        for i, part in enumerate(parts):
            output = Path(scratch) / f"results{i}.json"
            driver = _BATCH_DRIVER.replace("OUTPUT", repr(str(output)))
            child = subprocess.Popen(
                [sys.executable, "-c", driver],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
                cwd=REPO,
            )
            child.stdin.write(json.dumps([list(c) for c in part]))  # small: fits the pipe
            child.stdin.close()  # the driver reads its cases to the end, then starts
            child.stdin = None  # so that communicate() below only reads
            children.append((child, output))
        results = []
        for child, output in children:
            out, err = child.communicate(timeout=timeout)
            assert child.returncode == 0 and output.exists(), out + err
            results += json.loads(output.read_text())
    return [
        subprocess.CompletedProcess(list(args), code, stdout, stderr)
        for args, (code, stdout, stderr) in zip(cases, results, strict=True)
    ]
