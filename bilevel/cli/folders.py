"""Where the command line's runs and sweeps write, and what a failed start takes back.

Hydra makes a run's (or a sweep's) folder before the app starts, names the default one by the
second (``runs/<date>/<time>``), and writes its own record (``.hydra/``, ``multirun.yaml``) into
it. Before Hydra runs, the entry point (:func:`bilevel.cli.main`) therefore:

- refuses an explicit folder that is not the library's to write into, or that holds an earlier
  run or sweep (:func:`check_explicit`);
- points a ``resume=`` at the run's own folder without rewriting its record
  (:func:`resume_overrides`);
- makes the default folder itself, with ``-1``, ``-2``, ... where that second's exists, so runs
  started together get their own (:func:`default_folder`);
- notes which folders on the way existed (:class:`FoldersBefore`), so that a run that fails
  validation, or a sweep that stops before its first job, takes back only what it created
  (:func:`drop_fresh_run_dir`, :func:`take_back_sweep`).

Each check raises :class:`~bilevel.errors.ConfigError`; the entry point prints it as one line.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.logging import run_dir as run_dirs

__all__ = [
    "DEFAULT_RUN_DIR",
    "DEFAULT_SWEEP_DIR",
    "FoldersBefore",
    "check_explicit",
    "default_folder",
    "drop_fresh_run_dir",
    "last_value",
    "resume_overrides",
    "take_back_sweep",
]

DEFAULT_RUN_DIR = "runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
"""``hydra.run.dir`` of ``configs/config.yaml``."""

DEFAULT_SWEEP_DIR = "runs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"
"""``hydra.sweep.dir`` of ``configs/config.yaml``."""

MULTIRUN_FLAGS = ("-m", "--multirun")


def override_value(arg: str) -> str:
    """The value of a ``key=value`` override as Hydra reads it: quotes and escapes removed
    (``resume="/my runs/x"`` is ``/my runs/x``; read raw, the quotes were part of the path)."""
    raw = arg.split("=", 1)[1]
    if not any(c in raw for c in "\"'\\"):  # nothing to unquote: Hydra reads it as written
        return raw
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except HydraException:
        return raw
    return value if isinstance(value, str) else str(value)


def expand_paths(args: list[str]) -> list[str]:
    """``args`` with a value that starts with ``~/`` (a path: ``resume``, ``hydra.run.dir``,
    ``model.path``, ...) expanded to the home folder: Hydra refuses it unquoted
    (``LexerNoViableAltException``) and takes it literally quoted (a folder named ``~`` in the
    working directory)."""
    out = []
    for arg in args:
        key, eq, raw = arg.partition("=")
        if eq and not key.startswith("-") and raw.lstrip("\"'").startswith("~/"):
            value = os.path.expanduser(raw.strip("\"'") if raw[:1] in "\"'" else raw)
            quoted = value.replace("'", "\\'")
            arg = f"{key}='{quoted}'"
        out.append(arg)
    return out


def last_value(args: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` among the command-line ``args``, as Hydra reads it
    (``None``: absent)."""
    values = [override_value(a) for a in args if a.startswith(f"{key}=")]
    return values[-1] if values else None


class FoldersBefore:
    """Which folders on the way to a run's or sweep's folder existed before Hydra ran, taken
    from the folder's pattern (``hydra.run.dir`` / ``hydra.sweep.dir``). A folder's times change
    when an entry is added inside it, so they cannot tell afterwards.

    ``anchor`` is the nearest folder that existed on the literal part of the pattern (before any
    ``${...}``: ``runs`` of the default ``runs/${now:...}/${now:...}``); ``children`` the folders
    that existed directly inside it. A folder strictly below the anchor was created by this
    process unless it is one of those children."""

    def __init__(self, pattern: str) -> None:
        parts = Path(pattern).parts
        literal = Path(*parts[: next((i for i, p in enumerate(parts) if "${" in p), len(parts))])
        anchor = literal.absolute() if literal.parts else Path.cwd()
        while not anchor.is_dir() and anchor != anchor.parent:
            anchor = anchor.parent
        self.anchor = anchor.resolve()
        try:
            self.children = frozenset(c.resolve() for c in anchor.iterdir() if c.is_dir())
        except OSError:
            self.children = frozenset()

    def created(self, folder: Path) -> bool:
        folder = folder.resolve()
        return self.anchor in folder.parents and folder not in self.children

    def remove_empty(self, folder: Path) -> None:
        """Remove ``folder`` and the folders above it, as long as this process created them and
        they are empty."""
        try:
            while self.created(folder) and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        except OSError:
            pass


def check_explicit(args: list[str]) -> None:
    """An explicit ``hydra.run.dir`` (or ``hydra.sweep.dir`` of a sweep) that holds files bilevel
    did not write, or an earlier run (sweep) that it would overwrite, is refused before Hydra
    writes its own files (``.hydra/``, the log) there; without one, ``runs/`` must be
    creatable. Under torchrun only rank 0 checks: it alone writes there, and another rank that
    looked after rank 0 had begun to write refused the folder as foreign (exit 2 on that rank)."""
    if int(os.environ.get("RANK", "0")) > 0:
        return
    sweep = any(a in MULTIRUN_FLAGS for a in args)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    explicit = last_value(args, key)
    if explicit is None:  # the default runs/ under the current folder, when a run will write there
        flags = [a for a in args if a.startswith("-") and a not in MULTIRUN_FLAGS]
        if not flags and last_value(args, "resume") is None:
            run_dirs.check_creatable("runs", "run directory", key)
    elif sweep:
        run_dirs.check_sweep_writable(explicit)
    else:
        run_dirs.check_writable(explicit)
        if not _continues_in(args, explicit):
            run_dirs.check_new_run(explicit)


def _continues_in(args: list[str], folder: str) -> bool:
    """Whether ``resume=`` in ``args`` continues the run of ``folder`` itself (its directory or
    a checkpoint inside it), which may write there."""
    resume = last_value(args, "resume")
    if resume is None:
        return False
    try:
        _, run = run_dirs.resolve_resume(resume)
    except ConfigError:
        return False  # the resume itself is refused later, with its own line
    return run is not None and run.resolve() == Path(folder).resolve()


def resume_overrides(args: list[str]) -> list[str]:
    """For ``resume=<run dir of ours>`` (a single run): continue in that directory, without a
    new Hydra output folder (``hydra.run.dir`` pointed at it) and without rewriting its
    ``.hydra/`` record, which holds the run's own config and overrides (a resume's command
    line would replace them with ``resume=...`` alone). Also when ``hydra.run.dir`` names that
    same directory; another one gets a branch of the run, with its own record."""
    resume = last_value(args, "resume")
    if any(a.startswith("-") for a in args) or resume is None:
        return []
    _, run = run_dirs.resolve_resume(resume)
    explicit = last_value(args, "hydra.run.dir")
    if run is None:
        return []
    if explicit is None:
        return [f"hydra.run.dir={run}", "hydra.output_subdir=null"]
    return ["hydra.output_subdir=null"] if _continues_in(args, explicit) else []


def default_folder(args: list[str], composed: dict[str, Any] | None) -> list[str]:
    """For a run or a sweep in the default layout: the folder ``runs/<date>/<time>`` (a sweep's:
    ``runs/multirun/<date>/<time>``) made here, ``-1``, ``-2``, ... appended where that second's
    folder exists, and handed to Hydra as ``hydra.run.dir`` / ``hydra.sweep.dir``. Hydra names
    the folder by the second alone, so runs started in the same second (seeds launched in
    parallel) shared it: all but one were refused by its lock, after Hydra had overwritten the
    running one's saved config (which ``resume=`` reads); two sweeps wrote into the same job
    folders.

    ``composed`` is the ``hydra`` node of the config composed from ``args`` (unresolved), or
    ``None`` where it was not composed (Hydra flags, sweep overrides)."""
    if int(os.environ.get("RANK", "0")) > 0 or last_value(args, "resume") is not None:
        return []  # other ranks write nowhere; a resume continues in its run's folder
    flags = {a for a in args if a.startswith("-")}
    if composed is not None:  # no flags, no sweep overrides, only our configs
        multirun = str(composed.get("mode")) == "RunMode.MULTIRUN"  # e.g. an Optuna search
        key, pattern = ("sweep", DEFAULT_SWEEP_DIR) if multirun else ("run", DEFAULT_RUN_DIR)
        if composed[key]["dir"] != pattern:
            return []
    elif flags and flags <= set(MULTIRUN_FLAGS):
        if any(a.lstrip("+").startswith(("hydra.sweep.dir=", "hydra.searchpath")) for a in args):
            return []
        key = "sweep"
    else:
        return []
    now = datetime.datetime.now()
    base = Path("runs", *(["multirun"] if key == "sweep" else []), now.strftime("%Y-%m-%d"))
    base = base / now.strftime("%H-%M-%S")
    folder, n = base, 0
    while True:
        try:
            folder.mkdir(parents=True)  # atomic: of two processes, one makes it
            return [f"hydra.{key}.dir={folder}"]
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        except OSError:
            return []  # Hydra's own attempt reports it (check_creatable has said why)


def drop_fresh_run_dir(out: Path, before: FoldersBefore, log: logging.Logger) -> None:
    """After a failed validation: remove what Hydra just wrote into the run directory ``out``
    (``.hydra/``, the log, whose handlers are closed first), the directory itself if this
    process created it, and the folders above it that it created and that are now empty. A run
    directory that holds anything else is kept."""
    if not out.is_dir() or run_dirs.is_run_dir(out):
        return
    if any(p.name != ".hydra" and p.suffix != ".log" for p in out.iterdir()):
        return
    for handler in list(logging.root.handlers) + list(log.handlers):
        filename = getattr(handler, "baseFilename", None)
        if filename and Path(filename).resolve().parent == out.resolve():
            handler.close()
            logging.root.removeHandler(handler)
            log.removeHandler(handler)
    if not before.created(out):
        for entry in out.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return
    shutil.rmtree(out, ignore_errors=True)
    before.remove_empty(out.parent)


def take_back_sweep(folder: Path, before: FoldersBefore) -> None:
    """A sweep that stopped before its first job (nothing in its folder but Hydra's
    ``multirun.yaml``): remove the folders this process made for it."""
    if not before.created(folder):
        return
    if folder.is_dir() and {p.name for p in folder.iterdir()} == {"multirun.yaml"}:
        (folder / "multirun.yaml").unlink()
    before.remove_empty(folder)
