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


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


log = logging.getLogger("bilevel")


class RunLog:
    """Outputs of one run.

    Args:
        run_dir: the run directory (``None``: write no files).
        loggers: trackers the records also go to (:class:`~bilevel.logging.WandbLogger`,
            :class:`~bilevel.logging.TensorBoardLogger`, :class:`~bilevel.logging.MLflowLogger`
            or one's own with ``name``, ``start``, ``log`` and ``finish``).
        active: whether this process writes (the main rank).
        progress: show the progress of ``total`` steps starting at ``initial``: a bar on a
            terminal; where the output is not one (a log file, a scheduler's capture), one line
            per log event instead of a bar's redraws.
        resume_after_step: a resumed run keeps ``metrics.jsonl`` up to this step.
        config: the resolved config for the trackers; ``ids`` resume their runs
            (``{logger name: id}``).
    """

    def __init__(
        self,
        run_dir: Path | None,
        loggers: list[Any] | None = None,
        active: bool = True,
        progress: bool = True,
        total: int = 0,
        initial: int = 0,
        resume_after_step: int | None = None,
        config: dict[str, Any] | None = None,
        ids: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir if active else None
        self.loggers = [x for x in (loggers or []) if x is not None] if active else []
        self.writer = None
        self.ids = dict(ids or {})
        self.total = total
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for logger in self.loggers:  # first: a tracker that cannot start leaves no record
            name = getattr(logger, "name", type(logger).__name__)
            started = logger.start(self.run_dir or Path("."), config or {}, self.ids.get(name))
            if started is not None:
                self.ids[name] = str(started)
        if self.run_dir is not None:
            self.writer = JsonlWriter(self.run_dir / "metrics.jsonl", resume_after_step)
        self.bar = None
        self._console = None
        self.lines = progress and active and not _terminal()
        if progress and active and not self.lines:
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

    @property
    def wandb_id(self) -> str | None:
        return self.ids.get("wandb")

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)
        for logger in self.loggers:
            logger.log(record)

    def tested_at(self, step: int) -> bool:
        """Whether the records kept from before a resume end with a test record at ``step``
        (a finished run resumed with nothing left to train has one, unless its final
        evaluation failed)."""
        last = self.writer.last_kept if self.writer is not None else None
        return last is not None and last.get("step") == step and "test" in last

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, step: int | None = None, **values: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
        elif self.lines and step is not None:  # no terminal: one line a log event
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
            print(f"bilevel: step {step}/{self.total}: {shown}", file=sys.stderr, flush=True)

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
        for logger in self.loggers:
            logger.finish(summary)

    def close(self) -> None:
        if self._console is not None:
            self._console.__exit__(None, None, None)
            self._console = None
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
