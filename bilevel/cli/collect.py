"""One table for a sweep: ``results.csv`` and ``results.md`` in its folder, a row per job.

Every multirun writes them (a Hydra callback rewrites them after each job, so an interrupted
sweep still has the rows it finished); ``bilevel-collect <folder>`` rebuilds them for any folder
of runs. A row holds the job's number, its overrides, how it ended, the final meta loss (the
value an Optuna sweep minimizes, so it is also the trial's value), the test metrics, the learned
weights, the steps and the wall time.

    bilevel-collect runs/multirun/2026-11-26/14-03-11
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError, WriteError
from bilevel.files import write_text_atomic
from bilevel.logging.run_dir import FAILED, TABLE_HEADS, is_our_table

__all__ = ["CollectResults", "collect", "main", "write_tables"]


def _overrides(job: Path) -> list[str]:
    file = job / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return []
    try:
        import yaml

        value = yaml.safe_load(file.read_text())
    except Exception:  # noqa: BLE001 - a damaged file only costs the column
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _failure(job: Path, ended: str) -> tuple[str, str]:
    """How a job without a summary ended: the status and the one-line error it left (its
    :data:`FAILED` note), if any. Exit code 2 is bad input, 3 a stop on non-finite values, 1
    another one-line failure of the job (it ran out of memory)."""
    try:
        note = json.loads((job / FAILED).read_text())
    except (OSError, ValueError):
        return ended, ""
    status = {1: "error", 2: "bad input", 3: "not finite"}.get(note.get("exit_code"), ended)
    return status, str(note.get("error", "")).removeprefix("bilevel: ").removeprefix("error: ")


def _job_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (10**9, path.name)


def collect(folder: str | Path) -> list[dict[str, Any]]:
    """One row per job folder under ``folder`` (a folder with ``.hydra`` or ``summary.json``)."""
    folder = Path(folder)
    jobs = [
        p
        for p in folder.iterdir()
        if p.is_dir() and ((p / "summary.json").is_file() or (p / ".hydra").is_dir())
    ]
    rows = []
    for job in sorted(jobs, key=_job_key):
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(_overrides(job))}
        summary_file = job / "summary.json"
        if not summary_file.is_file():
            ended = "stopped" if (job / "checkpoints" / "last.pt").exists() else "failed"
            row["status"], row["error"] = _failure(job, ended)
            rows.append(row)
            continue
        try:
            summary = json.loads(summary_file.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:  # one bad file costs its row, not the table
            row["status"], row["error"] = "unreadable", f"summary.json: {err}"
            rows.append(row)
            continue
        row["status"] = "ok"
        row["solver"] = summary.get("solver")
        row["meta_loss"] = summary.get("meta_loss")
        for name, value in (summary.get("test") or {}).items():
            row[f"test_{name}"] = value
        for name, value in (summary.get("weights") or {}).items():
            row[f"w_{name}"] = value
        row["steps"] = summary.get("steps")
        row["wall_time_s"] = summary.get("wall_time_s")
        rows.append(row)
    return rows


def _add_trial_values(folder: Path, rows: list[dict[str, Any]]) -> None:
    """An Optuna sweep's trials: each job's value is the meta loss it returned; mark the best."""
    optuna = (folder / "optimization_results.yaml").exists() or any(
        "hparams_search=optuna" in row.get("overrides", "") for row in rows
    )
    if not optuna:
        return
    values = [r.get("meta_loss") for r in rows if isinstance(r.get("meta_loss"), int | float)]
    best = min(values) if values else None
    for row in rows:
        row["trial_value"] = row.get("meta_loss")
        row["best"] = "*" if best is not None and row.get("meta_loss") == best else ""


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    if "error" in columns:  # last, whichever row came first: the other columns line up
        columns.remove("error")
        columns.append("error")
    return columns


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def write_tables(folder: str | Path, rows: list[dict[str, Any]] | None = None) -> Path | None:
    """Write ``results.csv`` and ``results.md`` into ``folder``; returns the csv path (``None``
    when there is no job yet)."""
    folder = Path(folder)
    rows = collect(folder) if rows is None else rows
    if not rows:
        return None
    foreign = [
        folder / name
        for name in TABLE_HEADS
        if (folder / name).exists() and not is_our_table(folder / name)
    ]
    if foreign:
        raise ConfigError(
            "sweep results",
            f"{foreign[0]} exists and was not written by bilevel; it is left as it is "
            "(move it away, then run bilevel-collect on the folder)",
        )
    _add_trial_values(folder, rows)
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_text_atomic(folder / "results.csv", buffer.getvalue())
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows),
    ]
    write_text_atomic(folder / "results.md", "\n".join(lines) + "\n")
    return folder / "results.csv"


_said: set[str] = set()


def _write_or_say(folder: Path) -> Path | None:
    """:func:`write_tables`, or one line (once per folder) when a table there is not ours."""
    try:
        return write_tables(folder)
    except (ConfigError, OSError) as err:  # the table is a summary: the sweep goes on
        if str(folder) not in _said:
            _said.add(str(folder))
            print(f"bilevel: sweep results not written: {err}", file=sys.stderr, flush=True)
        return None


try:  # Hydra's callback base class (hydra-core >= 1.1)
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class CollectResults(_Callback):
    """Hydra callback: rewrite the sweep folder's tables after every job and at the end."""

    def _folder(self, config: Any) -> Path | None:
        try:
            return Path(str(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001
            return None

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.get().mode != RunMode.MULTIRUN:
                return
        except Exception:  # noqa: BLE001
            return
        folder = self._folder(config)
        if folder is not None and folder.is_dir():
            _write_or_say(folder)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        folder = self._folder(config)
        if folder is not None and folder.is_dir():
            path = _write_or_say(folder)
            if path is not None:
                print(f"sweep results: {path} (and results.md)", flush=True)


def _no_runs(folder: Path) -> str:
    """Why ``folder`` gave no table, and where the runs are when they are one level off: the
    folder is a run itself, or it holds folders of runs (``runs/multirun/<date>``)."""
    if (folder / "summary.json").is_file() or (folder / ".hydra").is_dir():
        return (
            f"{folder} is one run; give the folder that holds the runs to compare (e.g. "
            f"{folder.parent})"
        )
    below = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and collect(p)
    )  # e.g. the sweeps of one day
    if below:
        shown = ", ".join(below[:5]) + (" ..." if len(below) > 5 else "")
        return f"no runs directly under {folder}; these folders in it hold runs: {shown}"
    return f"no runs under {folder}"


def main(argv: list[str] | None = None) -> None:
    """``bilevel-collect <folder>``: rebuild a sweep folder's results.csv and results.md."""
    parser = argparse.ArgumentParser(
        prog="bilevel-collect",
        description="Rebuild results.csv and results.md (one row per run) for a folder of runs, "
        "e.g. a multirun sweep folder.",
    )
    parser.add_argument("folder", help="a sweep folder (runs/multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"bilevel-collect: error: {folder} is not a directory", file=sys.stderr)
        sys.exit(2)
    try:
        path = write_tables(folder)
    except ConfigError as err:
        print(f"bilevel-collect: error: {err}", file=sys.stderr)
        sys.exit(2)
    except WriteError as err:  # a full disk, a read-only folder: the tables keep their last
        print(f"bilevel-collect: error: {err}", file=sys.stderr)
        sys.exit(1)
    if path is None:
        print(f"bilevel-collect: error: {_no_runs(folder)}", file=sys.stderr)
        sys.exit(2)
    print((folder / "results.md").read_text(), end="")
    print(f"written: {path} and {folder / 'results.md'}")


if __name__ == "__main__":
    main()
