"""The tables offline mixture search reads and writes: mixtures (a run id, then one share per
domain) and metrics (the same ids, then one column per metric), as CSV files or a sweep folder's
``results.csv``.

Every problem with them is one :class:`~bilevel.errors.ConfigError` line that names the file,
the row and the column: a share that is negative or not a number, a row that does not sum to 1
(within 1e-2; rows within it are renormalized), ids that do not match between the two files, a
target column that is not there.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bilevel.errors import ConfigError

__all__ = ["SUM_TOLERANCE", "Table", "join", "read_metrics", "read_mixtures", "write_table"]

SUM_TOLERANCE = 1e-2
"""How far a row of shares may sum from 1 (shares rounded to 3 decimals sum to 1 +- K/2000)."""


@dataclass
class Table:
    """Rows of numbers by id: ``values[i, j]`` is column ``columns[j]`` of run ``ids[i]``."""

    ids: list[str]
    columns: list[str]
    values: np.ndarray


def _rows(path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise ConfigError(what, f"{path}: no such file")
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ConfigError(what, f"{path}: needs a header and at least one row")
    head, body = [c.strip() for c in rows[0]], rows[1:]
    if len(head) < 2:
        raise ConfigError(what, f"{path}: needs an id column and at least one more column")
    for i, row in enumerate(body, 2):
        if len(row) != len(head):
            raise ConfigError(
                what, f"{path}, line {i}: {len(row)} fields where the header has {len(head)}"
            )
    ids = [r[0].strip() for r in body]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(what, f"{path}: ids appear more than once: {', '.join(repeated[:5])}")
    return head, body


def _number(text: str, path: Path, row: str, column: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            what, f"{path}, id {row}, column {column!r}: {text!r} is not a number"
        ) from None
    return value


def _sweep_table(folder: Path, what: str) -> Path:
    table = folder / "results.csv"
    if not table.is_file():
        raise ConfigError(
            what,
            f"{folder} is a folder without results.csv: give a CSV file, or a sweep folder "
            "(bilevel-collect writes its results.csv)",
        )
    return table


def _from_sweep(path: Path, what: str, shares: bool) -> Table:
    """A sweep's ``results.csv``: the jobs that finished (``status`` ok); shares from its
    ``w_<domain>`` columns, metrics from its other numeric columns."""
    head, body = _rows(path, what)
    status = head.index("status") if "status" in head else None
    body = [r for r in body if status is None or r[status] == "ok"]
    if not body:
        raise ConfigError(what, f"{path}: no job of the sweep finished")
    if shares:
        picked = [j for j, c in enumerate(head) if c.startswith("w_")]
        names = [head[j][2:] for j in picked]
    else:
        skip = {"job", "status", "error", "best", "steps", "wall_time_s"}
        picked = [
            j
            for j, c in enumerate(head)
            if j and c not in skip and not c.startswith("w_") and _numeric(body, j)
        ]
        names = [head[j] for j in picked]
    if not picked:
        raise ConfigError(what, f"{path}: no {'w_<domain>' if shares else 'metric'} columns")
    ids = [r[0] for r in body]
    values = np.array(
        [[_number(r[j], path, r[0], head[j], what) for j in picked] for r in body], dtype=float
    )
    return Table(ids, names, values)


def _numeric(body: list[list[str]], j: int) -> bool:
    try:
        [float(r[j]) for r in body if r[j] != ""]
    except ValueError:
        return False
    return any(r[j] != "" for r in body)


def read_mixtures(path: str | Path, what: str = "--mixtures") -> Table:
    """Mixtures: a CSV file (an id column, then one share column per domain) or a sweep folder
    (its ``results.csv``: the learned or fixed weights ``w_<domain>`` of each finished job).
    Rows are checked (finite, >= 0, summing to 1 within :data:`SUM_TOLERANCE`) and
    renormalized."""
    path = Path(path)
    if path.is_dir():
        table = _from_sweep(_sweep_table(path, what), what, shares=True)
    else:
        head, body = _rows(path, what)
        values = np.array(
            [[_number(c, path, r[0], head[j + 1], what) for j, c in enumerate(r[1:])] for r in body]
        )
        table = Table([r[0].strip() for r in body], head[1:], values)
    for i, row in enumerate(table.values):
        bad = [c for c, v in zip(table.columns, row) if not math.isfinite(v) or v < 0]
        if bad:
            raise ConfigError(
                what,
                f"{path}, id {table.ids[i]}: the share of {bad[0]!r} is "
                f"{row[table.columns.index(bad[0])]}: shares must be numbers >= 0",
            )
        total = float(row.sum())
        if abs(total - 1) > SUM_TOLERANCE:
            raise ConfigError(
                what,
                f"{path}, id {table.ids[i]}: the shares sum to {total:.4f}; each row must sum "
                f"to 1 (within {SUM_TOLERANCE})",
            )
    table.values = table.values / table.values.sum(1, keepdims=True)
    return table


def read_metrics(path: str | Path, what: str = "--metrics") -> Table:
    """Metrics: a CSV file (an id column, then one column per metric) or a sweep folder (the
    numeric columns of its ``results.csv``: meta_loss, test_*, val_*)."""
    path = Path(path)
    if path.is_dir():
        return _from_sweep(_sweep_table(path, what), what, shares=False)
    head, body = _rows(path, what)
    values = np.array(
        [
            [
                _number(c, path, r[0], head[j + 1], what) if c.strip() != "" else math.nan
                for j, c in enumerate(r[1:])
            ]
            for r in body
        ]
    )
    return Table([r[0].strip() for r in body], head[1:], values)


def join(mixtures: Table, metrics: Table, target: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The rows both tables hold, by id: ``(ids, shares [n, K], target [n])``. Ids that only
    one of the tables holds, and a target that is missing or not finite, are errors."""
    if target not in metrics.columns:
        raise ConfigError(
            "--target",
            f"{target!r} is not a column of the metrics; its columns: "
            + ", ".join(metrics.columns),
        )
    known = set(mixtures.ids)
    extra = [i for i in metrics.ids if i not in known]
    missing = [i for i in mixtures.ids if i not in set(metrics.ids)]
    if extra or missing:
        said = []
        if missing:
            said.append(
                f"{len(missing)} mixture ids have no metrics (e.g. {', '.join(missing[:3])})"
            )
        if extra:
            said.append(f"{len(extra)} metric ids have no mixture (e.g. {', '.join(extra[:3])})")
        raise ConfigError(
            "--metrics", "; ".join(said) + ": the two tables must describe the same runs"
        )
    column = metrics.columns.index(target)
    where = {i: k for k, i in enumerate(metrics.ids)}
    y = np.array([metrics.values[where[i], column] for i in mixtures.ids])
    bad = [mixtures.ids[k] for k in np.flatnonzero(~np.isfinite(y))]
    if bad:
        raise ConfigError(
            "--target", f"{target} is missing or not finite for ids {', '.join(bad[:5])}"
        )
    return list(mixtures.ids), mixtures.values, y


def write_table(path: str | Path, ids: list[str], columns: list[str], values: np.ndarray) -> Path:
    """A CSV of an ``id`` column and ``columns`` (numbers to 6 decimals)."""
    from bilevel.files import write_text_atomic

    lines = [",".join(["id", *columns])]
    for i, row in zip(ids, values, strict=True):
        lines.append(
            ",".join(
                [str(i), *(f"{v:.6g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.6e}" for v in row)]
            )
        )
    return write_text_atomic(Path(path), "\n".join(lines) + "\n")
