"""Every ```python block of the README runs, in order, from a scratch folder.

A block whose first line is a comment naming a path (``# my_pkg/losses.py``) is written to that
file instead of being run; the others run one after another in one namespace, with the scratch
folder as the working directory and on ``sys.path``, as a reader pasting them into a session
would run them.
"""

import contextlib
import io
import os
import re
import sys

from tests.integration.helpers import REPO

FILE_BLOCK = re.compile(r"#\s*([\w./-]+\.\w+)\s*(?:\(.*\))?$")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for block in blocks:
        first = block.splitlines()[0].strip()
        target = FILE_BLOCK.fullmatch(first)
        if target:
            path = tmp_path / target.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, f"README block {ran + 1}", "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 3
    for name in list(sys.modules):
        if name == "my_pkg" or name.startswith("my_pkg."):
            del sys.modules[name]
    assert os.getcwd() == str(tmp_path)
