"""Files written by the library are never half-written."""

import pytest

from bilevel.files import write_atomic, write_text_atomic
from bilevel.logging.jsonl import JsonlWriter, read_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def crash(fh):
        fh.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
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
