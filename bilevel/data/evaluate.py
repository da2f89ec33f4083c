"""Test-set metrics: the shipped tasks' evaluator, and the check every evaluator's answer passes."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import module_state
from bilevel.data.columns import Columns, chunks
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch, model_scores

__all__ = [
    "checked_metrics",
    "classification_metrics",
    "default_evaluator",
    "lm_metrics",
    "output_logits",
    "regression_metrics",
]


def output_logits(output: Any) -> torch.Tensor:
    """The class scores ``[B, C]`` in a model's output (:func:`~bilevel.losses.shapes.
    model_scores`: the output itself, its ``logits``, or a tuple's first element). Anything
    else is a :class:`ConfigError` that says to give ``data.evaluate`` metrics of one's own (a
    model returning a dict failed after the whole run with "'dict' object has no attribute
    'float'")."""
    scores = model_scores(output)
    if isinstance(scores, torch.Tensor):
        return scores
    raise ConfigError(
        "data.evaluate",
        f"the classification metrics read class scores [B, C] from the model's output, which "
        f"is a {type(output).__name__} without a tensor 'logits': give data.evaluate a "
        "function of your own, (model, columns, device) -> {metric: number}",
    )


@torch.no_grad()
def classification_metrics(
    model: nn.Module, columns: Columns, device: torch.device, chunk: int = 4096
) -> dict[str, float]:
    """``{"accuracy", "loss"}`` of a classifier on ``columns`` (``x``, ``y``)."""
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    with module_state.evaluation(model):
        for batch in chunks(columns, chunk):
            logits = output_logits(forward_batch(model, batch)).float()
            correct += (logits.argmax(-1) == batch["y"]).sum()
            loss += F.cross_entropy(logits, batch["y"], reduction="sum").double()
            n += len(batch["y"])
    return {"accuracy": correct.item() / n, "loss": loss.item() / n}


@torch.no_grad()
def lm_metrics(
    model: nn.Module, columns: Columns, device: torch.device, chunk: int = 64
) -> dict[str, float]:
    """Next-token ``loss`` (mean cross-entropy per token), ``perplexity`` and ``accuracy`` of a
    language model on ``columns`` (``x`` the inputs, ``y`` the next tokens ``[N, T]``), in
    chunks of ``chunk`` sequences (a batch's logits are ``[chunk, T, vocabulary]``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), device=device)
    count = 0
    with module_state.evaluation(model):
        for batch in chunks(columns, chunk):
            logits = output_logits(forward_batch(model, batch)).float()
            y = batch["y"]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == y).sum()
            count += y.numel()
    loss = total.item() / count
    return {
        "loss": loss,
        "perplexity": float(torch.tensor(loss).exp()),
        "accuracy": correct.item() / count,
    }


@torch.no_grad()
def regression_metrics(
    model: nn.Module, columns: Columns, device: torch.device, chunk: int = 4096
) -> dict[str, float]:
    """``{"mse", "mae"}`` of a model whose output (or its ``logits``) has ``y``'s shape."""
    squared = torch.zeros((), device=device, dtype=torch.float64)
    absolute = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    with module_state.evaluation(model):
        for batch in chunks(columns, chunk):
            out = model_scores(forward_batch(model, batch))
            y = batch["y"]
            diff = (
                (out.reshape(y.shape).double() - y.double()) if out.numel() == y.numel() else None
            )
            if diff is None:
                raise ConfigError(
                    "data.evaluate",
                    f"the regression metrics compare outputs {tuple(out.shape)} with y "
                    f"{tuple(y.shape)}: give data.evaluate a function of your own",
                )
            squared += diff.square().sum()
            absolute += diff.abs().sum()
            n += y.numel()
    return {"mse": squared.item() / n, "mae": absolute.item() / n}


def default_evaluator(output: Any, columns: Columns) -> Any:
    """The metrics a test set's targets say it needs, for data given without ``evaluate``:
    integer labels ``[N]`` against class scores ``[N, C]`` (classification), integer next
    tokens ``[N, T]`` against ``[N, T, V]`` (language modelling), float targets of the output's
    size (regression); ``None`` where they say nothing the library can score."""
    scores = model_scores(output)
    y = columns.get("y") if isinstance(columns, Mapping) else None
    if not isinstance(scores, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None
    if not y.is_floating_point() and y.dim() == 1 and scores.dim() == 2:
        return classification_metrics
    if not y.is_floating_point() and y.dim() == 2 and scores.dim() == 3:
        return lm_metrics
    if y.is_floating_point() and scores.numel() // max(1, scores.shape[0]) == y[0].numel():
        return regression_metrics
    return None


def checked_metrics(value: Any) -> dict[str, float]:
    """An evaluator's answer as ``{metric: float}``: one-element tensors and numpy scalars are
    read as numbers (a tensor in the summary failed its JSON write after the whole run had
    trained); any other kind of answer or value is a :class:`ConfigError` naming
    ``data.evaluate``."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            "data.evaluate",
            f"must return a dict {{metric name: number}}, got {type(value).__name__}",
        )
    metrics: dict[str, float] = {}
    for name, item in value.items():
        if isinstance(item, torch.Tensor) and item.numel() == 1:
            item = item.item()
        elif hasattr(item, "item") and getattr(item, "size", None) == 1:  # a numpy scalar
            item = item.item()
        if not isinstance(item, numbers.Real):
            raise ConfigError(
                "data.evaluate",
                f"metric {name!r} must be a number (or a one-element tensor), got "
                f"{type(item).__name__}",
            )
        metrics[str(name)] = float(item)
    return metrics
