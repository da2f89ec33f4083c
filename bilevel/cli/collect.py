"""One table for a sweep: ``results.csv`` and ``results.md`` in its folder, a row per job.

Every multirun writes them (a Hydra callback rewrites them after each job, so an interrupted
sweep still has the rows it finished); ``bilevel-collect <folder>`` rebuilds them for any folder
of runs. A row holds the job's number, one column per swept override key (the overrides every
job shares are said once, above the table in ``results.md``), how it ended, the final meta loss,
the test and validation metrics, the sweep's ``optimized_metric`` (an Optuna trial's value) with
the best job marked, the learned weights, the steps and the wall time.

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

from bilevel.cli.failures import metric_of
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


def _yaml(file: Path) -> Any:
    try:
        import yaml

        return yaml.safe_load(file.read_text())
    except Exception:  # noqa: BLE001 - a missing or damaged file only costs what it held
        return None


def _pairs(overrides: list[str]) -> dict[str, str]:
    """``["solver=cg", "++data.x=1"]`` -> ``{"solver": "cg", "data.x": "1"}``."""
    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def _objective(job: Path) -> tuple[str, str | None]:
    """The job's ``optimized_metric`` and, under an Optuna sweep, its direction."""
    config = _yaml(job / ".hydra" / "config.yaml")
    metric = config.get("optimized_metric") if isinstance(config, dict) else None
    hydra = _yaml(job / ".hydra" / "hydra.yaml")
    try:
        direction = hydra["hydra"]["sweeper"].get("direction")
    except (TypeError, KeyError, AttributeError):
        direction = None
    return str(metric or "meta_loss"), str(direction) if isinstance(direction, str) else None


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
        metric, direction = _objective(job)
        row: dict[str, Any] = {
            "job": job.name,
            "_overrides": _pairs(_overrides(job)),
            "_metric": metric,
            "_direction": direction,
        }
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
        for split in ("test", "val"):
            for name, value in (summary.get(split) or {}).items():
                row[f"{split}_{name}"] = value
        row["_value"] = metric_of(summary, metric)
        for name, value in (summary.get("weights") or {}).items():
            row[f"w_{name}"] = value
        row["steps"] = summary.get("steps")
        row["wall_time_s"] = summary.get("wall_time_s")
        rows.append(row)
    return rows


_MAXIMIZED = ("accuracy", "acc", "f1", "auc", "precision", "recall", "ndcg", "score")


def _direction(rows: list[dict[str, Any]]) -> str:
    """Which way the sweep's metric is better: the Optuna sweeper's ``direction`` when there is
    one, else by the metric's name (accuracies and scores up, losses and perplexities down)."""
    for row in rows:
        if row.get("_direction") in ("minimize", "maximize"):
            return row["_direction"]
    last = str(rows[0].get("_metric", "meta_loss")).rsplit(".", 1)[-1].lower()
    return "maximize" if any(word in last for word in _MAXIMIZED) else "minimize"


def _shape(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn the rows' private fields into columns: one per override key whose value is not the
    same in every job (a key some jobs lack counts as swept), the optimized metric (when it is
    not a column already), the best job's mark and, for Optuna, the trial's value. Returns what
    the table's header says once: the overrides every job shares, the metric and direction."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.get("_overrides", {}) if k not in keys]
    swept = [k for k in keys if len({row.get("_overrides", {}).get(k, "\0") for row in rows}) > 1]
    fixed = {k: rows[0]["_overrides"][k] for k in keys if k not in swept}
    metric = str(rows[0].get("_metric", "meta_loss"))
    direction = _direction(rows)
    column = metric.replace(".", "_")
    values = [r.get("_value") for r in rows if isinstance(r.get("_value"), int | float)]
    finite = [v for v in values if math.isfinite(v)]
    best = (max if direction == "maximize" else min)(finite) if finite else None
    optuna = any(r.get("_direction") for r in rows) or "hparams_search" in fixed
    solvers = {r.get("solver") for r in rows if r.get("status") == "ok"}
    drop_solver = "solver" in swept or len(solvers) <= 1
    for i, row in enumerate(rows):
        overrides = row.pop("_overrides", {})
        value = row.pop("_value", None)
        row.pop("_metric", None), row.pop("_direction", None)
        shaped: dict[str, Any] = {"job": row.pop("job")}
        shaped.update({k: overrides.get(k, "") for k in swept})
        if drop_solver:
            row.pop("solver", None)
        shaped.update(row)
        if row.get("status") == "ok":
            if column not in shaped:
                shaped[column] = value
            if optuna:
                shaped["trial_value"] = value
            shaped["best"] = "*" if best is not None and value == best else ""
        rows[i] = shaped
    header = {"fixed": fixed, "metric": metric, "direction": direction}
    if drop_solver and len(solvers) == 1:
        header["solver"] = next(iter(solvers))
    return header


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
    if isinstance(value, str) and len(value) > 8:  # a swept number Optuna drew: 0.1120186...
        try:
            return f"{float(value):.4g}"
        except ValueError:
            pass
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
    header = _shape(rows)
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_text_atomic(folder / "results.csv", buffer.getvalue())
    fixed = " ".join(f"`{k}={v}`" for k, v in header["fixed"].items())
    better = "highest" if header["direction"] == "maximize" else "lowest"
    lines = [
        f"# Sweep results: {folder.name}",
        "",
        *([f"Every job: {fixed}", ""] if fixed else []),
        *([f"Solver: {header['solver']}", ""] if header.get("solver") else []),
        f"Optimized metric: `{header['metric']}` ({better} is best, marked * in `best`)",
        "",
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
