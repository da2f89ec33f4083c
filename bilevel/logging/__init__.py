"""Run logging: ``metrics.jsonl`` always, wandb when configured, plots at the end."""

from bilevel.logging.jsonl import JsonlWriter, read_jsonl
from bilevel.logging.plots import plot_weights
from bilevel.logging.run_log import RunLog
from bilevel.logging.wandb_logger import WandbLogger

__all__ = ["JsonlWriter", "RunLog", "WandbLogger", "plot_weights", "read_jsonl"]
