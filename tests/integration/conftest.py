import contextlib
import io
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bilevel.cli import config_dir, run


@pytest.fixture
def run_cli(tmp_path):
    """Compose the app's config with ``overrides`` and run it in-process into ``tmp_path``."""

    def _run(*overrides, out=None):
        out = Path(out or tmp_path / "run")
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=["trainer.progress=false", *overrides])
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run(cfg, output_dir=out, overrides=list(overrides))
        return summary, out

    return _run
