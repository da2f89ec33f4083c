"""What a run leaves behind: its folder (which folders the library may write into, and the lock
of a running one), ``metrics.jsonl`` always, wandb when configured, ``summary.json`` and the
plots at the end; TensorBoard, MLflow (offline, into the run directory) and wandb when asked for,
and where a run came from (provenance). It imports only the core."""

from bilevel.logging.jsonl import JsonlWriter, read_jsonl
from bilevel.logging.mlflow_logger import MLflowLogger
from bilevel.logging.plots import plot_weights
from bilevel.logging.run_log import RunLog
from bilevel.logging.tensorboard_logger import TensorBoardLogger
from bilevel.logging.wandb_logger import WandbLogger

__all__ = [
    "JsonlWriter",
    "MLflowLogger",
    "RunLog",
    "TensorBoardLogger",
    "WandbLogger",
    "plot_weights",
    "read_jsonl",
]
