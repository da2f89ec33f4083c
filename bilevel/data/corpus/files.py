"""Documents from files on disk: jsonl, json, parquet and plain text, split into blocks.

A *block* is the unit a domain is read in: a byte range of a jsonl or text file (cut at line
ends, found by seeking: no scan of the file), a parquet row group, a whole json file, or a whole
text file read as one document. Blocks are read when a stream reaches them, so nothing of a
corpus is loaded whole; their order is shuffled per epoch by the stream.

Bad input is one line naming the file (and the line, for jsonl): a glob that matches nothing,
an empty file or domain, a line that is not JSON or lacks the text field, a parquet column
that is missing or not text. ``skip_bad_rows`` skips such rows and counts them instead.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError

__all__ = ["Block", "FileSource", "expand_globs"]

#: the suffixes read, and how
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass(frozen=True)
class Block:
    """One piece of a domain read in one go: ``path`` and a ``start``/``stop`` range (bytes
    of a line file, a row group of a parquet file, rows of a dataset); ``size`` is its size in
    bytes (or rows), for estimates."""

    path: str
    kind: str
    start: int
    stop: int
    size: int


def expand_globs(field: str, patterns: Any) -> list[Path]:
    """The files ``patterns`` (a glob or a list of globs, ``~`` expanded) match, sorted; a
    ConfigError naming ``field`` when one matches nothing."""
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    if not isinstance(patterns, list | tuple) or not patterns:
        raise ConfigError(field, f"must be a glob or a list of globs, got {patterns!r}")
    files: list[Path] = []
    for pattern in patterns:
        text = os.path.expanduser(str(pattern))
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise ConfigError(field, f"{text!r} matches no file")
        files += found
    return list(dict.fromkeys(files))


def _kind(path: Path, field: str, text_document: str) -> str:
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if suffix in TEXT_SUFFIXES or suffix == "":
        return "lines" if text_document == "line" else "text"
    raise ConfigError(
        field,
        f"{path}: cannot read {suffix!r} files; use .jsonl, .json, .parquet or plain text (.txt)",
    )


class FileSource:
    """The documents of one domain: its files, split into blocks.

    Args:
        field: the config key that named the files (for messages), e.g. ``data.domains.news``.
        patterns: a glob or a list of globs.
        text_field: the field (column) that holds a document's text (jsonl, json, parquet).
        text_document: ``line`` (each line of a text file is a document) or ``file``.
        block_bytes: the size of a block of a line file.
        skip_bad_rows: skip (and count) rows that are not JSON or lack the text field,
            instead of stopping with one line.
    """

    def __init__(
        self,
        field: str,
        patterns: Any,
        text_field: str = "text",
        text_document: str = "line",
        block_bytes: int = 1 << 22,
        skip_bad_rows: bool = False,
    ) -> None:
        self.field, self.text_field = field, text_field
        self.skip_bad_rows = skip_bad_rows
        self.files = expand_globs(field, patterns)
        self.blocks: list[Block] = []
        for path in self.files:
            size = path.stat().st_size
            if size == 0:
                raise ConfigError(field, f"{path} is empty")
            kind = _kind(path, field, text_document)
            if kind in ("jsonl", "lines"):
                self.blocks += _line_blocks(path, kind, size, block_bytes)
            elif kind == "parquet":
                self.blocks += _parquet_blocks(path, field, text_field)
            else:
                self.blocks.append(Block(str(path), kind, 0, size, size))
        self.nbytes = sum(b.size for b in self.blocks)

    def read(self, block: Block) -> tuple[list[str], int]:
        """The documents of ``block`` and how many bad rows were skipped in it."""
        if block.kind in ("jsonl", "lines"):
            with open(block.path, "rb") as fh:
                fh.seek(block.start)
                data = fh.read(block.stop - block.start)
            lines = data.split(b"\n")
            if block.kind == "lines":
                docs = [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]
                return [d for d in docs if d.strip()], 0
            return self._json_lines(block, lines)
        if block.kind == "text":
            return [Path(block.path).read_text(encoding="utf-8", errors="replace")], 0
        if block.kind == "json":
            return self._json_file(block)
        return self._parquet(block)

    # -- the formats ------------------------------------------------------------------------------

    def _json_lines(self, block: Block, lines: list[bytes]) -> tuple[list[str], int]:
        docs, bad = [], 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                bad += self._bad(block, i, f"is not JSON ({err.msg})")
                continue
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                what = (
                    f"has no text field {self.text_field!r} (data.text_field)"
                    if not isinstance(row, dict) or self.text_field not in row
                    else f"holds a {type(text).__name__} in {self.text_field!r}, not text"
                )
                bad += self._bad(block, i, what)
                continue
            docs.append(text)
        return docs, bad

    def _bad(self, block: Block, index: int, what: str) -> int:
        """Count a bad row, or stop with one line naming its file and line."""
        if self.skip_bad_rows:
            return 1
        with open(block.path, "rb") as fh:  # only now: the line number is worth one read
            before = fh.read(block.start).count(b"\n")
        raise ConfigError(
            self.field,
            f"{block.path}, line {before + index + 1}: {what}; fix the file, or set "
            "data.skip_bad_rows=true to skip and count such rows",
        )

    def _json_file(self, block: Block) -> tuple[list[str], int]:
        try:
            rows = json.loads(Path(block.path).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(self.field, f"{block.path} is not JSON ({err})") from None
        if isinstance(rows, dict):
            lists = [v for v in rows.values() if isinstance(v, list)]
            rows = lists[0] if len(lists) == 1 else None
        if not isinstance(rows, list):
            raise ConfigError(
                self.field,
                f"{block.path}: a .json file must hold a list of records (or an object with one "
                "list); use .jsonl for one record a line",
            )
        docs, bad = [], 0
        for i, row in enumerate(rows):
            text = row if isinstance(row, str) else (row or {}).get(self.text_field)
            if isinstance(text, str):
                docs.append(text)
            elif self.skip_bad_rows:
                bad += 1
            else:
                raise ConfigError(
                    self.field,
                    f"{block.path}, record {i}: has no text field {self.text_field!r} "
                    "(data.text_field); or set data.skip_bad_rows=true",
                )
        return docs, bad

    def _parquet(self, block: Block) -> tuple[list[str], int]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(block.path).read_row_group(block.start, columns=[self.text_field])
        values = table.column(0).to_pylist()
        docs = [v for v in values if isinstance(v, str)]
        return docs, len(values) - len(docs)


def _line_blocks(path: Path, kind: str, size: int, block_bytes: int) -> list[Block]:
    """Byte ranges of about ``block_bytes`` that start and end at line ends (found by seeking
    to each boundary and reading on to the next newline)."""
    starts = [0]
    with open(path, "rb") as fh:
        position = block_bytes
        while position < size:
            fh.seek(position)
            fh.readline()  # on to the end of the line that crosses the boundary
            boundary = fh.tell()
            if boundary >= size:
                break
            if boundary > starts[-1]:
                starts.append(boundary)
            position = max(boundary, starts[-1]) + block_bytes
    stops = [*starts[1:], size]
    return [Block(str(path), kind, a, b, b - a) for a, b in zip(starts, stops, strict=True)]


def _parquet_blocks(path: Path, field: str, text_field: str) -> list[Block]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            field, f"{path}: reading parquet needs pyarrow: pip install -e '.[corpora]'"
        ) from None
    try:
        meta = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same input error
        raise ConfigError(field, f"{path} is not a readable parquet file ({err})") from None
    schema = meta.schema_arrow
    if text_field not in schema.names:
        raise ConfigError(
            field,
            f"{path} has no column {text_field!r} (data.text_field); its columns: "
            f"{', '.join(schema.names)}",
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(field, f"{path}: column {text_field!r} is {kind}, not text (string)")
    groups = meta.metadata.num_row_groups
    size = path.stat().st_size
    if groups == 0 or meta.metadata.num_rows == 0:
        raise ConfigError(field, f"{path} holds no rows")
    return [Block(str(path), "parquet", g, g + 1, max(1, size // groups)) for g in range(groups)]
