"""Weights & Biases logging: config, losses and one series per domain weight.

Offline unless the user is logged in: ``mode="auto"`` runs online only when an API key is found
(``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai); ``WANDB_MODE`` always wins.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import shutil
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError, first_line

__all__ = ["WandbLogger"]

#: ``auto`` (online when logged in, else offline) and wandb's own modes
MODES = ("auto", "online", "offline", "disabled", "shared")
#: what wandb itself takes in ``WANDB_MODE``
ENV_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def _check_environment() -> None:
    """Refuse, before any run directory exists, a ``WANDB_*`` variable that wandb would reject
    at ``wandb.init`` (e.g. ``WANDB_SILENT=""``), naming the variable instead of a pydantic
    traceback in the middle of the run's start."""
    mode = os.environ.get("WANDB_MODE")
    if mode and mode not in ENV_MODES:
        raise ValueError(
            f"the environment variable WANDB_MODE={mode!r} is not a wandb mode; valid: "
            f"{', '.join(ENV_MODES)} (or unset it and choose logger.wandb.mode)"
        )
    import wandb

    settings = wandb.Settings()
    update = getattr(settings, "update_from_env_vars", None)
    if update is None:  # another wandb: it checks its variables itself
        return
    for name, value in sorted(os.environ.items()):
        if not name.startswith("WANDB_"):
            continue
        try:
            update({name: value})
        except Exception as err:  # wandb validates its settings with pydantic
            errors = getattr(err, "errors", None)
            why = errors()[0].get("msg") if callable(errors) and errors() else str(err)
            raise ValueError(
                f"the environment variable {name}={value!r} is refused by wandb: {why} "
                "(give it a valid value or unset it)"
            ) from None


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Mirror every log record to a wandb run (``weights/<name>``, ``inner_loss``, ...)."""

    name = "wandb"

    def __init__(
        self,
        project: str = "bilevel",
        entity: str | None = None,
        mode: str = "auto",
        name: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if tags is not None and (
            isinstance(tags, str) or not all(isinstance(t, str) for t in tags)
        ):
            raise ValueError(f"tags must be a list of strings, e.g. [baseline,cg], got {tags!r}")
        self.kwargs = {
            "project": project,
            "entity": entity,
            "name": name,
            "tags": list(tags or []),
            "group": group,
        }
        _check_environment()
        if os.environ.get("WANDB_MODE"):
            mode = os.environ["WANDB_MODE"]
        elif mode == "auto":
            mode = "online" if _logged_in() else "offline"
        self.mode = mode
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> str:
        import wandb

        kwargs = dict(self.kwargs)
        # quiet: wandb's own lines say where the run is saved (and how to sync it), without the
        # 30-line history and summary dump at the end that buried the run's own summary
        kwargs.setdefault("settings", wandb.Settings(quiet=True))
        folder = Path(run_dir) / "wandb"
        existed = folder.exists()
        try:
            self.run = wandb.init(
                dir=str(run_dir),
                config=config,
                mode=self.mode,
                id=resume_id,
                resume="allow" if resume_id else None,
                **kwargs,
            )
        except Exception as err:  # wandb's own (no network, a bad key): not the user's code
            teardown = getattr(wandb, "teardown", None)
            if callable(teardown):  # now: wandb's closing lines come before the error line,
                with contextlib.suppress(Exception):  # not after it at exit
                    teardown()
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            why = first_line(str(err)) or type(err).__name__
            hint = (
                "; where this machine cannot reach wandb, log offline (WANDB_MODE=offline) and "
                "upload later with `wandb sync <run dir>/wandb`"
                if self.mode != "offline"
                else ""
            )
            raise ConfigError(
                "logger.wandb", f"wandb could not start its run (mode {self.mode}): {why}{hint}"
            ) from None
        return self.run.id

    def log(self, record: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            elif key != "step":
                flat[key] = value
        self.run.log(flat, step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    self.run.summary[f"{key}/{k}"] = v
            else:
                self.run.summary[key] = value
        self.run.finish()
