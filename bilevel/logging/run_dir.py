"""Which folders the library may write into.

A run directory is *ours* when it holds the marker file ``.bilevel-run.json``, written when the
library first claims the folder. The library writes only into folders that are ours, or that it
may make ours: a new or empty folder, or one that holds nothing but Hydra's own files (``.hydra/``
and its log). Anything else is refused with one line, so a mistyped ``hydra.run.dir`` or a
checkpoint kept in some other folder never costs the user a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bilevel.errors import ConfigError
from bilevel.files import write_text_atomic

__all__ = [
    "FAILED",
    "MARKER",
    "check_new_run",
    "check_sweep_writable",
    "check_writable",
    "claim",
    "holds_results",
    "in_run",
    "hydra_only",
    "is_our_table",
    "is_run_dir",
    "release",
    "resolve_resume",
]

MARKER = ".bilevel-run.json"

FAILED = "failed.json"
"""What a sweep job that ended with a one-line error leaves in its folder (the line and the exit
code), so that the sweep's table can say why; the folder stays reusable."""


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory the library created."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("bilevel_run") is True
    except (OSError, ValueError):
        return False


def holds_results(path: str | Path) -> bool:
    """Whether the run directory ``path`` holds what an earlier run produced (a checkpoint, a
    summary, metric records): a new run there would overwrite it."""
    path = Path(path)
    checkpoints = path / "checkpoints"
    metrics = path / "metrics.jsonl"
    return (
        (path / "summary.json").is_file()
        or (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def check_new_run(path: str | Path, key: str = "hydra.run.dir") -> None:
    """Raise :class:`ConfigError` if ``path`` is a run directory that holds an earlier run: a
    new run (not a resume of it) would overwrite its checkpoint, metrics and summary, and
    Hydra its saved config (which ``resume=`` reads). ``key`` is how the user chooses the
    folder, for the message."""
    if is_run_dir(path) and holds_results(path):
        how = f"BilevelTrainer.resume({str(path)!r})" if key == "run_dir" else f"resume={path}"
        raise ConfigError(
            "run directory",
            f"{path} holds an earlier run, which a new run would overwrite: continue it with "
            f"{how}, or choose another folder ({key}=...)",
        )


def hydra_only(path: Path) -> bool:
    """Only Hydra's own files (and the note of a failed sweep job)."""
    return all(p.name in (".hydra", FAILED) or p.suffix == ".log" for p in path.iterdir())


def check_creatable(path: str | Path, field: str, key: str = "hydra.run.dir") -> None:
    """Raise :class:`ConfigError` unless files can be written at ``path`` (its nearest existing
    folder must be a directory that accepts new entries), so that Hydra does not fail with a
    traceback when it creates the folder. Tried for real, with a scratch folder that is
    removed at once: permissions alone do not tell (e.g. ``/proc`` for root)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"cannot create {path}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bilevel-check-", dir=existing))
    except OSError as err:
        raise ConfigError(
            field,
            f"cannot write into {existing} ({err.strerror}): choose another folder ({key}=...)",
        ) from None


def check_writable(path: str | Path) -> None:
    """Raise :class:`ConfigError` unless the library may write into ``path``: new, empty, only
    Hydra's own files, or a run directory of ours. The command line checks an explicit
    ``hydra.run.dir`` with this before Hydra writes its own files there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError("run directory", f"{path} is a file, not a directory")
    check_creatable(path, "run directory")
    if path.is_dir() and not is_run_dir(path) and not hydra_only(path):
        raise ConfigError(
            "run directory",
            f"{path} holds files that bilevel did not write; it writes only into new or empty "
            "directories or its own run directories: choose another (hydra.run.dir=...)",
        )


TABLE_HEADS = {"results.csv": ("job,",), "results.md": ("# Sweep results", "| job |")}
"""How the first line of a sweep table that bilevel wrote begins (``bilevel.cli.collect``)."""


def is_our_table(path: str | Path) -> bool:
    """Whether ``path`` is a sweep table (``results.csv`` / ``results.md``) bilevel wrote."""
    path = Path(path)
    head = TABLE_HEADS.get(path.name)
    if head is None or not path.is_file():
        return False
    try:
        with path.open() as handle:
            return handle.readline().startswith(tuple(head))
    except (OSError, UnicodeDecodeError):
        return False


def check_sweep_writable(path: str | Path) -> None:
    """Raise :class:`ConfigError` unless ``path`` may hold a sweep: new, or holding only what
    Hydra and bilevel write there (job run directories, ``multirun.yaml``, Optuna's results,
    logs and bilevel's own ``results.csv``/``results.md``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError("sweep directory", f"{path} is a file, not a directory")
    check_creatable(path, "sweep directory", "hydra.sweep.dir")
    if not path.is_dir():
        return
    hydra_files = {"multirun.yaml", "optimization_results.yaml", ".hydra"}
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and is_run_dir(entry) and holds_results(entry):
            raise ConfigError(
                "sweep directory",
                f"{path} holds the runs of an earlier sweep (job {entry.name}), which this "
                "sweep would overwrite: choose another folder (hydra.sweep.dir=...)",
            )
        if entry.is_dir() and (is_run_dir(entry) or hydra_only(entry)):
            continue
        if entry.name in hydra_files or entry.suffix == ".log" or is_our_table(entry):
            continue
        raise ConfigError(
            "sweep directory",
            f"{path} holds files that bilevel did not write ({entry.name}); a sweep writes only "
            "into a new folder or one of its own sweeps: choose another (hydra.sweep.dir=...)",
        )


def claim(path: str | Path) -> Path:
    """Make ``path`` a run directory of ours, or raise :class:`ConfigError` if it holds files the
    library did not write. Returns the path."""
    path = Path(path)
    check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_run_dir(path):
        write_text_atomic(
            path / MARKER,
            json.dumps({"bilevel_run": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}),
        )
    return path


LOCK = ".bilevel-run.lock"


def release(path: str | Path) -> None:
    """Undo :func:`claim` for a run that stopped before writing anything (its logger could not
    start): the marker and the lock file go, so the folder is no run directory and can be
    removed, or used for a new run. Called after the lock is released."""
    path = Path(path)
    if any((path / name).exists() for name in ("metrics.jsonl", "checkpoints", "summary.json")):
        return
    for name in (MARKER, LOCK):
        (path / name).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``path`` while a run writes there: a second
    process (the same ``resume=`` launched twice, a requeued job whose first copy still runs)
    is refused with one line instead of interleaving its records and checkpoints with the
    first's. The lock is the operating system's (``flock``), so a killed run never leaves a
    stale one. Where ``fcntl`` does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    file = Path(path) / LOCK
    handle = file.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigError(
                "run directory",
                f"{path} is in use by {owner}; wait for that run to end, or stop it first",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"bilevel process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def in_run(run: str | os.PathLike) -> Path:
    """``<run>/checkpoints/last.pt``, the checkpoint a run directory continues from; a
    ConfigError naming ``resume`` when it is not there (a run that stopped before its first
    checkpoint, or a folder that holds none)."""
    file = Path(run) / "checkpoints" / "last.pt"
    if not file.is_file():
        raise ConfigError(
            "resume", f"no checkpoint at {file} (expected <run dir>/checkpoints/last.pt)"
        )
    return file


def resolve_resume(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint file, run directory to continue in)`` for ``resume=path``.

    ``path`` is a run directory of ours (continue in it), or a checkpoint file: inside a run
    directory of ours (``<run>/checkpoints/last.pt``: continue in that run), or anywhere else
    (its folder is not ours: the run continues in a new directory, ``None``).
    """
    if not str(path).strip():  # Path("") is ".": `resume=$RUN` with RUN unset read the cwd
        raise ConfigError(
            "resume", "is empty: give the run directory to continue (resume=<run dir>)"
        )
    path = Path(path)
    if not path.exists():
        raise ConfigError("resume", f"{path} does not exist")
    if path.is_dir():
        if not is_run_dir(path):
            jobs = sorted(
                (p for p in path.iterdir() if p.is_dir() and is_run_dir(p)),
                key=lambda p: (len(p.name), p.name),
            )
            hint = (
                f"; it holds {len(jobs)} run director{'y' if len(jobs) == 1 else 'ies'} (a "
                f"sweep's jobs?): resume one of them, e.g. resume={jobs[0]}"
                if jobs
                else "; give a run directory that bilevel created, or a checkpoint file"
            )
            raise ConfigError(
                "resume", f"{path} is not a bilevel run directory (no {MARKER}){hint}"
            )
        return in_run(path), path
    run = path.parent.parent
    if path.parent.name == "checkpoints" and is_run_dir(run):
        return path, run
    return path, None
