"""Log a run to TensorBoard, offline, into the run directory (``<run dir>/tensorboard``):
the weights, per-domain losses, meta loss, test metrics and, for corpora, the effective
mixture, one scalar each (``tensorboard --logdir <run dir>`` shows them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.logging.scalars import scalars

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Write every log record's numbers as TensorBoard scalars.

    Args:
        log_dir: where the event files go (default ``<run dir>/tensorboard``).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logger.tensorboard",
                "needs the tensorboard package: pip install -e '.[loggers]' (or tensorboard)",
            ) from None
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.writer = None
        self.last_step = 0

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> str:
        folder = Path(self.log_dir) if self.log_dir else Path(run_dir) / "tensorboard"
        # a resumed run appends to its folder: TensorBoard reads every event file in it
        self.writer = self._writer_class(log_dir=str(folder))
        return str(folder)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", self.last_step))
        self.last_step = step
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            return
        final = {k: v for k, v in summary.items() if k in ("test", "val", "meta_loss")}
        for key, value in scalars(final).items():
            self.writer.add_scalar(f"final/{key}", value, self.last_step)
        self.writer.close()
