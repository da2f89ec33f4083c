"""Weights & Biases logging: config, losses and one series per domain weight.

Offline unless the user is logged in: ``mode="auto"`` runs online only when an API key is found
(``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai); ``WANDB_MODE`` always wins.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

__all__ = ["WandbLogger"]

#: ``auto`` (online when logged in, else offline) and wandb's own modes
MODES = ("auto", "online", "offline", "disabled", "shared")


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Mirror every log record to a wandb run (``weights/<name>``, ``inner_loss``, ...)."""

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
        self.run = wandb.init(
            dir=str(run_dir),
            config=config,
            mode=self.mode,
            id=resume_id,
            resume="allow" if resume_id else None,
            **kwargs,
        )
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
