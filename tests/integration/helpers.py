"""Helpers shared by the end-to-end tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def read_summary(path):
    return json.loads((Path(path) / "summary.json").read_text())
