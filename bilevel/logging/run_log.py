"""Where a run's outputs go: ``metrics.jsonl``, wandb, the progress bar, and at the end
``summary.json`` and ``weights.png``. Only the main rank writes; the others get a silent log."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from bilevel.files import write_text_atomic
from bilevel.logging.jsonl import JsonlWriter, read_jsonl, to_jsonable
from bilevel.logging.plots import plot_weights

__all__ = ["RunLog"]

log = logging.getLogger("bilevel")


class RunLog:
    """Outputs of one run.

    Args:
        run_dir: the run directory (``None``: write no files).
        wandb: an optional :class:`~bilevel.logging.WandbLogger`.
        active: whether this process writes (the main rank).
        progress: show a progress bar of ``total`` steps starting at ``initial``.
        resume_after_step: a resumed run keeps ``metrics.jsonl`` up to this step.
        config: the resolved config for wandb; ``wandb_id`` resumes a wandb run.
    """

    def __init__(
        self,
        run_dir: Path | None,
        wandb: Any = None,
        active: bool = True,
        progress: bool = True,
        total: int = 0,
        initial: int = 0,
        resume_after_step: int | None = None,
        config: dict[str, Any] | None = None,
        wandb_id: str | None = None,
    ) -> None:
        self.run_dir = run_dir if active else None
        self.wandb = wandb if active else None
        self.writer = None
        self.wandb_id = wandb_id
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb is not None:  # first: a logger that cannot start leaves no record behind
            self.wandb_id = self.wandb.start(self.run_dir or Path("."), config or {}, wandb_id)
        if self.run_dir is not None:
            self.writer = JsonlWriter(self.run_dir / "metrics.jsonl", resume_after_step)
        self.bar = None
        self._console = None
        if progress and active:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="bilevel",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
            # while the bar is drawn, a terminal log line (a note, a skipped step, the stop
            # line) is written above it instead of onto the bar's line
            self._console = logging_redirect_tqdm(tqdm_class=type(self.bar))
            self._console.__enter__()

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)
        if self.wandb is not None:
            self.wandb.log(record)

    def tested_at(self, step: int) -> bool:
        """Whether the records kept from before a resume end with a test record at ``step``
        (a finished run resumed with nothing left to train has one, unless its final
        evaluation failed)."""
        last = self.writer.last_kept if self.writer is not None else None
        return last is not None and last.get("step") == step and "test" in last

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, **values: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run_dir is not None:
            text = json.dumps(to_jsonable(summary), indent=2)
            write_text_atomic(self.run_dir / "summary.json", text)
            try:  # a picture of what the files hold: its failure must not fail the run
                per_example = summary.get("parametrization") == "meta_weight_net"
                plot_weights(
                    read_jsonl(self.run_dir / "metrics.jsonl"),
                    self.run_dir / "weights.png",
                    title=(
                        "mean per-example weight of each domain"
                        if per_example
                        else "domain weights"
                    )
                    + f" ({summary.get('solver', '')})",
                    info=summary.get("info"),
                    ylabel="mean weight (batch mean 1)" if per_example else "weight",
                )
            except Exception as err:  # noqa: BLE001 - reported, the run's results are saved
                log.warning(f"note: weights.png not drawn ({type(err).__name__}: {err})")
        if self.wandb is not None:
            self.wandb.finish(summary)

    def close(self) -> None:
        if self._console is not None:
            self._console.__exit__(None, None, None)
            self._console = None
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
