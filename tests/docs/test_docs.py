"""Every ```python block of the README and of the docs runs, page by page, from a scratch folder,
and the docs site builds with ``mkdocs build --strict``.

A block whose first line is a comment naming a path (``# my_pkg/losses.py``) is written to that
file instead of being run; the others run one after another in one namespace, with the scratch
folder as the working directory and on ``sys.path``, as a reader pasting them into a session
would run them.
"""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli

FILE_BLOCK = re.compile(r"#\s*([\w./-]+\.\w+)\s*(?:\(.*\))?$")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def run_blocks(text: str, where: str, tmp_path) -> int:
    """Run every ```python block of ``text`` in order, in one namespace, from ``tmp_path`` (a
    block whose first line names a file is written there instead); returns how many ran."""
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in python_blocks(text):
        first = block.splitlines()[0].strip()
        target = FILE_BLOCK.fullmatch(first)
        if target:
            path = tmp_path / target.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{where} block {ran + 1}", "exec"), namespace)  # noqa: S102
        ran += 1
        check_shown_output(block, out.getvalue(), ran)
    for name in list(sys.modules):
        if name == "my_pkg" or name.startswith("my_pkg."):
            del sys.modules[name]
    return ran


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_of_every_page_runs(page, tmp_path, monkeypatch):
    """Each page (the README and every page of docs/) runs in its own namespace, as a reader
    pasting its blocks into a fresh session would run them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_blocks((REPO / page).read_text(), page, tmp_path)
    assert os.getcwd() == str(tmp_path)


def test_the_readme_and_the_guide_hold_runnable_examples():
    counts = {page: len(python_blocks((REPO / page).read_text())) for page in PAGES}
    assert counts["README.md"] >= 1
    assert counts["docs/getting-started.md"] >= 4
    assert counts["docs/concepts.md"] >= 1
    assert len(PAGES) >= 12


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: no broken link, reference or docstring the API pages read."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?|-?\d+")


def check_shown_output(block: str, printed: str, index: int) -> None:
    """Where a top-level ``print(...)  # <literal>`` shows its output in a comment (a dict, a
    list or a number), the block printed that, to the comment's rounding: a README whose shown
    numbers drifted from what the code prints fails here."""
    prints = [line for line in block.splitlines() if line.startswith("print(")]
    lines = printed.splitlines()
    if len(prints) != len(lines):  # prints in loops or helpers: nothing to pair
        return
    for statement, line in zip(prints, lines, strict=True):
        shown = statement.split("#", 1)[1].strip() if "#" in statement else ""
        if shown[:1] not in ("{", "[") and not NUMBER.fullmatch(shown):
            continue
        want = [float(x) for x in NUMBER.findall(shown)]
        got = [float(x) for x in NUMBER.findall(line)]
        assert len(want) == len(got), f"README block {index}: shows {shown}, printed {line}"
        for w, g in zip(want, got, strict=True):
            assert abs(w - g) <= 2e-3, f"README block {index}: shows {shown}, printed {line}"


def command_line_examples(text: str) -> list[list[str]]:
    """The ``bilevel-run`` lines of the first bash block of the command-line page, as override
    lists (comments and quotes removed)."""
    import shlex

    section = text.split("# Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["bilevel-run"]:
            out.append(words[1:])
    return out


def test_every_command_line_example_of_the_guide_runs(tmp_path, monkeypatch):
    """Each example runs as written, shortened to a few steps (GPU ones only where CUDA is)."""
    import torch
    from hydra import compose, initialize_config_dir

    from bilevel.cli import config_dir, run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    examples = command_line_examples((REPO / "docs" / "cli.md").read_text())
    assert len(examples) >= 10
    short = ["trainer.steps=6", "trainer.log_every=3", "trainer.progress=false"]
    ran = 0
    for i, overrides in enumerate(examples):
        if overrides[:1] == ["--cfg"]:
            printed = cli(*overrides)
            assert printed.returncode == 0 and "solver:" in printed.stdout, printed.stderr
            continue
        if "device=cuda" in overrides and not torch.cuda.is_available():
            continue
        full = [*overrides, *short]
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=full)
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run(cfg, output_dir=tmp_path / f"example{i}", overrides=full)
        assert summary["steps"] == 6, overrides
        ran += 1
    assert ran >= 10
