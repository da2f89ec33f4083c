"""Files written by the library are never half-written."""

import os
import re
import stat

import pytest

from bilevel.errors import WriteError
from bilevel.files import write_atomic, write_text_atomic
from bilevel.logging.jsonl import JsonlWriter, read_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def crash(fh):
        fh.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=f"^cannot write {re.escape(str(path))}: No space left"):
        write_atomic(path, crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_text_atomic(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"


def test_resuming_the_metrics_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    for step in (10, 20, 30):
        writer.write({"step": step})
    writer.close()
    JsonlWriter(path, resume_after_step=20).close()
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_plot_that_fails_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    """weights.png is a picture of what the files hold: summary.json is written first, and a
    plotting error becomes a note instead of a failed run at its very end."""
    import json

    from bilevel.logging import run_log

    def broken(*args, **kwargs):
        raise ValueError("no backend")

    monkeypatch.setattr(run_log, "plot_weights", broken)
    out = run_log.RunLog(tmp_path, progress=False)
    out.write({"step": 0, "weights": {"a": 0.5, "b": 0.5}, "meta_loss": 1.0})
    with caplog.at_level("WARNING", logger="bilevel"):
        out.finish({"weights": {"a": 0.5, "b": 0.5}})
    out.close()
    assert json.loads((tmp_path / "summary.json").read_text())["weights"] == {"a": 0.5, "b": 0.5}
    assert "weights.png not drawn (ValueError: no backend)" in caplog.text


def test_an_unreadable_summary_costs_its_row_not_the_sweep_table(tmp_path):
    import json

    from bilevel.cli.collect import collect

    for job, text in (("0", json.dumps({"meta_loss": 0.5, "weights": {"a": 1.0}})), ("1", "{")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "summary.json").write_text(text)
    rows = collect(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "unreadable"]
    assert rows[0]["meta_loss"] == 0.5 and rows[1]["error"].startswith("summary.json: ")


@pytest.mark.parametrize(
    "where,said",
    [
        ("day/sweep/0", r"is one run; give the folder that holds the runs to compare \(e.g. "),
        ("day", "no runs directly under .*day; these folders in it hold runs: sweep"),
    ],
)
def test_collect_pointed_one_level_off_says_where_the_runs_are(tmp_path, capsys, where, said):
    """A run folder, or a day's folder of sweeps, gave 'no runs under X' and nothing else."""
    import json

    from bilevel.cli.collect import main

    job = tmp_path / "day" / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({"meta_loss": 0.5, "weights": {"a": 1.0}}))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / where)])
    assert stop.value.code == 2
    assert re.search(said, capsys.readouterr().err)
    assert not (tmp_path / where / "results.csv").exists()


def test_a_weights_plot_of_many_domains_names_the_largest_and_keeps_the_legend_beside(tmp_path):
    """40 domains put a 40-entry legend over the lines in ten repeated colours: now the 12
    largest final weights are named, beside the axes, and the rest are grey."""
    import matplotlib.image

    from bilevel.logging import plots

    names = [f"domain_{i}" for i in range(40)]
    records = [
        {"step": s, "weights": {n: 0.025 + 1e-5 * s * (i - 20) for i, n in enumerate(names)}}
        for s in (0, 10, 20)
    ]
    assert plots._named({n: [r["weights"][n] for r in records] for n in names}) == [
        f"domain_{i}" for i in range(39, 27, -1)
    ]
    few = {n: [0.1] for n in names[:5]}
    assert plots._named(few) == names[:5]
    for count, path in ((40, tmp_path / "many.png"), (4, tmp_path / "few.png")):
        picked = [{**r, "weights": dict(list(r["weights"].items())[:count])} for r in records]
        assert plots.plot_weights(picked, path) == path
    wide, narrow = (matplotlib.image.imread(tmp_path / f).shape[1] for f in ("many.png", "few.png"))
    assert wide > narrow  # the legend beside the axes widens the figure


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_atomic_files_get_the_permissions_of_a_plain_file_or_keep_their_own(tmp_path):
    """mkstemp makes its file 0o600: every summary, checkpoint and plot was unreadable to the
    rest of a group sharing the run folder."""
    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_text_atomic(tmp_path / "summary.json", "{}")
        expected = stat.S_IMODE(plain.stat().st_mode)
        assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == expected
    finally:
        os.umask(old)
    (tmp_path / "summary.json").chmod(0o604)  # chosen by the user: kept on a rewrite
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o604


def test_a_metrics_line_that_cannot_be_written_names_its_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    writer.write({"step": 1})

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

    writer._fh = FullDisk()
    with pytest.raises(WriteError, match="^cannot write .*metrics.jsonl: No space left"):
        writer.write({"step": 2})
    assert read_jsonl(path) == [{"step": 1}]


def test_collect_that_cannot_write_its_tables_is_one_line(tmp_path, capsys, monkeypatch):
    from bilevel.cli import collect

    def full_disk(folder):
        raise WriteError(folder / "results.csv", OSError(28, "No space left on device"))

    monkeypatch.setattr(collect, "write_tables", full_disk)
    with pytest.raises(SystemExit) as stop:
        collect.main([str(tmp_path)])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    target = tmp_path / "results.csv"
    assert err == f"bilevel-collect: error: cannot write {target}: No space left on device"


def test_a_log_file_that_cannot_be_written_says_so_once(tmp_path, capsys):
    """logging printed a whole traceback for every record it could not write (a full disk):
    the run's log file says so in one line and stops trying."""
    import logging

    from bilevel.logging.log_file import RunLogFile

    handler = RunLogFile(tmp_path / "cli.log")

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    handler.stream = FullDisk()
    logger = logging.getLogger("bilevel.test_full_disk")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(3):
            logger.warning("line %d", i)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"bilevel: warning: cannot write {tmp_path / 'cli.log'} (No space left on device); the "
        "run's story goes to the terminal only from here"
    ]
