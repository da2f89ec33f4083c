"""What a run that failed from inside a component leaves behind, and what a sweep optimizes.

A bug in a user's model, loss or data builder (or in the library) keeps its traceback; the
run folder gets ``summary.json`` with ``status: failed``, the error and its traceback beside the
run's ``cli.log``, so that the folder says what happened instead of holding an empty log. Where
the library can read the error against what it knows (a model whose first layer takes another
width than the data's inputs), the line on the terminal says so.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bilevel.errors import ConfigError, first_line
from bilevel.files import write_text_atomic
from bilevel.logging import run_dir as run_dirs
from bilevel.logging.provenance import provenance

__all__ = ["crash_hint", "failure_summary", "metric_of", "optimized_value"]

_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")


def crash_hint(err: BaseException, context: dict[str, Any]) -> str:
    """The likely cause of ``err`` where the library can tell, else ``""``."""
    text = str(err)
    found = _MATMUL.search(text)
    if found:
        given, wanted = int(found.group(2)), int(found.group(3))
        sizes = context.get("model_kwargs") or {}
        announced = {k: v for k, v in sizes.items() if v == given}
        said = ", ".join(f"{k}={v}" for k, v in announced.items())
        return (
            f"a layer of the model takes inputs of width {wanted} but gets {given}"
            + (f" (the data's model_kwargs say {said})" if said else "")
            + ": size the model from the data (a model factory with an in_dim argument gets "
            "it from data.model_kwargs), or fix the width it was given"
        )
    return ""


def failure_summary(out: Path, err: BaseException, hint: str) -> Path | None:
    """``summary.json`` of a run that failed, in its folder ``out`` (made a run directory of
    ours where it holds only Hydra's files); ``None`` where the folder is not ours to write."""
    try:
        if not out.is_dir() or not (run_dirs.is_run_dir(out) or run_dirs.hydra_only(out)):
            return None
        run_dirs.claim(out)
        summary = {
            "status": "failed",
            "error": f"{type(err).__name__}: {first_line(str(err))}",
            "hint": hint,
            "traceback": "".join(traceback.format_exception(err)),
            "provenance": provenance(),
        }
        return write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    except (OSError, ConfigError):  # the report of a failure must not fail
        return None


def metric_of(summary: dict[str, Any], name: str) -> float | None:
    """The number at ``name`` in ``summary``: a top-level key (``meta_loss``) or a dotted path
    (``test.accuracy``, ``val.loss``); ``None`` where there is none."""
    value: Any = summary
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def optimized_value(summary: dict[str, Any], cfg: DictConfig) -> float:
    """What the app returns to a sweeper (Optuna minimizes or maximizes it): the summary's
    ``optimized_metric`` (default ``meta_loss``)."""
    name = str(cfg.get("optimized_metric") or "meta_loss")
    value = metric_of(summary, name)
    if value is None:
        numbers = sorted(
            [
                k
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            ]
            + [f"{group}.{k}" for group in ("test", "val") for k in (summary.get(group) or {})]
        )
        raise ConfigError(
            "optimized_metric",
            f"{name!r} is not a number of this run's summary; its numbers: {', '.join(numbers)}",
        )
    return value


def check_optimized_metric(cfg: DictConfig, trainer: Any) -> None:
    """Refuse before training an ``optimized_metric`` the run cannot produce: a ``val.*`` metric
    without a validation split, a ``test.*`` one without a test set (a sweep would train every
    trial and then have nothing to compare)."""
    name = str(cfg.get("optimized_metric") or "meta_loss")
    split = name.partition(".")[0]
    if split == "val" and getattr(trainer, "val", None) is None:
        raise ConfigError(
            "optimized_metric",
            f"{name} needs a validation split, and this data has none (data.val_size=N for "
            "the generated data, a `val` for your own DomainData, data.val=<glob> for "
            "corpora)",
        )
    if split == "test" and getattr(trainer, "test", None) is None:
        raise ConfigError("optimized_metric", f"{name} needs a test set, and this data has none")
