"""Log a run to MLflow, offline: an SQLite store in the run directory (``<run dir>/mlflow.db``;
any ``tracking_uri`` of one's own instead), with the run's config as parameters and every log
record's numbers as metrics (``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db``
shows them). SQLite rather than a folder of files: MLflow 3 refuses its file store unless told
to accept it, and one database file is easy to copy with the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.logging.scalars import scalars

__all__ = ["MLflowLogger"]


def _params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_params(value, f"{name}."))
        else:
            out[name] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


class MLflowLogger:
    """Mirror the run to an MLflow run.

    Args:
        experiment: the MLflow experiment's name.
        tracking_uri: where runs are stored (default: ``sqlite:///<run dir>/mlflow.db``).
        run_name: the MLflow run's name (default: MLflow's).
    """

    name = "mlflow"

    def __init__(
        self,
        experiment: str = "bilevel",
        tracking_uri: str | None = None,
        run_name: str | None = None,
    ) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "logger.mlflow",
                "needs mlflow: pip install -e '.[loggers]' (or mlflow-skinny)",
            ) from None
        self.mlflow = mlflow
        self.experiment, self.tracking_uri, self.run_name = experiment, tracking_uri, run_name
        self.client = None
        self.run_id: str | None = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> str:
        import logging

        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
        # creating the database logs each migration step: not the run's story
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        if resume_id is not None:
            self.run_id = resume_id
            return resume_id
        found = self.client.get_experiment_by_name(self.experiment)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(experiment, run_name=self.run_name)
        self.run_id = run.info.run_id
        params = _params(config)
        if params:
            self.client.log_batch(
                self.run_id,
                params=[self.mlflow.entities.Param(k, v) for k, v in list(params.items())[:100]],
            )
        return self.run_id

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        metrics = [self.mlflow.entities.Metric(k, v, 0, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.client is None:
            return
        final = {k: v for k, v in summary.items() if k in ("test", "val", "meta_loss")}
        metrics = [
            self.mlflow.entities.Metric(f"final/{k}", v, 0, int(summary.get("steps", 0)))
            for k, v in scalars(final).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.client.set_terminated(self.run_id)
