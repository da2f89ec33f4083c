"""``metrics.jsonl``: one JSON object per log event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bilevel.errors import WriteError
from bilevel.files import write_text_atomic

__all__ = ["JsonlWriter", "read_jsonl", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Floats that JSON can hold (NaN/inf become strings), nested containers converted."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


class JsonlWriter:
    """Writes records to ``path``, one line each, flushed as they come.

    A new run starts the file afresh; a resumed run (``resume_after_step``) keeps the records
    up to the checkpoint's step and appends after them.
    """

    def __init__(self, path: str | Path, resume_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_after_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_after_step]
        # atomic: a crash here must not lose the records of the run being resumed
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        #: the last record kept from before a resume (``None``: none)
        self.last_kept: dict[str, Any] | None = kept[-1] if kept else None
        self._fh = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(to_jsonable(record)) + "\n")
            self._fh.flush()
        except OSError as err:  # a torn last line is skipped by read_jsonl
            raise WriteError(self.path, err) from err

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
