import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bilevel.cli import config_dir, run
from bilevel.cli.preflight import open_domain_keys
from tests.helpers import cli

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores (the CI machine): one thread each, and one for the processes
    # they start (CLI runs, torchrun ranks), instead of four threads fighting over two cores
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_cli(tmp_path):
    """Compose the app's config with ``overrides`` and run it in-process into ``tmp_path``."""

    def _run(*overrides, out=None):
        overrides = open_domain_keys(list(overrides))  # as bilevel-run's main does
        out = Path(out or tmp_path / "run")
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=["trainer.progress=false", *overrides])
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run(cfg, output_dir=out, overrides=list(overrides))
        return summary, out

    return _run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its directory and checkpoint)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = cli("experiment=tiny", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out
