"""The library writes only into folders it owns: foreign files, a folder in use, a file where a
folder should be."""

import pytest

from bilevel import (
    TrainerConfig,
)
from bilevel.errors import ConfigError
from tests.helpers import cli, read_summary
from tests.trainer.helpers import small_trainer


def test_resume_from_a_checkpoint_in_a_foreign_folder_touches_nothing_there(tmp_path, finished):
    foreign = tmp_path / "some" / "dir"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("mine\n")
    (foreign / "summary.json").write_text('{"mine": 1}')
    (foreign / "sub" / "foo.pt").write_bytes((finished / "checkpoints" / "last.pt").read_bytes())
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    new = tmp_path / "new"
    proc = cli(f"resume={foreign / 'sub' / 'foo.pt'}", "trainer.steps=60", f"hydra.run.dir={new}")
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before
    assert read_summary(new)["steps"] == 60 and read_summary(new)["resumed_from"]


def test_a_run_directory_with_foreign_files_is_refused(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    proc = cli("experiment=tiny", f"hydra.run.dir={target}")
    assert proc.returncode == 2 and "bilevel: error: run directory" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]  # not even Hydra's files
    assert (target / "notes.txt").read_text() == "keep me"


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, finished):
    """The same resume launched twice (or a requeued job while its first copy still runs)
    would interleave two runs' records and checkpoints in one folder."""
    import shutil
    import subprocess
    import sys

    from bilevel.logging import run_dir as run_dirs

    run = shutil.copytree(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen(  # another process holds the run directory
        [
            sys.executable,
            "-c",
            "import sys, time; from bilevel.logging import run_dir as r\n"
            f"with r.locked({str(run)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cli(f"resume={run}", "trainer.steps=60")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{run} is in use by bilevel process {holder.pid}" in lines[0]
        assert (run / "metrics.jsonl").read_text() == before  # nothing of the run was touched
    finally:
        holder.kill()
        holder.wait()
    with run_dirs.locked(run):  # the lock ends with its process: no stale lock is left
        pass


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    trainer = small_trainer(TrainerConfig(steps=10, progress=False), run_dir=tmp_path / "file")
    with pytest.raises(ConfigError, match="run_dir: cannot create .* is a file, not a directory"):
        trainer.fit()
    assert (tmp_path / "file").read_text() == "mine"


def test_only_rank_0_checks_the_run_folder_under_torchrun(tmp_path, monkeypatch):
    """Rank 1 checked the folder after rank 0 had claimed it, took it for an earlier run and
    stopped with exit 2 (a race: seen once in CI on test_fsdp_with_cg_runs)."""
    from bilevel.cli import folders as cli_folders
    from bilevel.logging.run_dir import claim

    claim(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')  # rank 0 has begun
    args = ["experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="holds an earlier run"):
        cli_folders.check_explicit(args)
    monkeypatch.setenv("RANK", "1")
    cli_folders.check_explicit(args)
