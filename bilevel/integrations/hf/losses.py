"""The losses the mixin reads from a Hugging Face model: one loss per example (what the domain
weights multiply) and the meta loss.

A causal language model (its class among transformers' causal-LM classes, peft wrappers
unwrapped) predicts token t + 1 from position t: its per-example loss is the mean cross-entropy
of the shifted tokens whose label is not -100. A sequence classifier's is the cross-entropy of
its logits ``[B, C]`` (or the squared error of a one-output regression); a token classifier's
the mean over the labelled tokens, unshifted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.functional import model_scores

__all__ = ["is_causal_lm", "meta_loss_fn", "per_example_loss"]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a peft wrapper holds) is a transformers causal LM."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is what this module is for
        return False
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    name = type(base).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM")


def per_example_loss(output: Any, batch: Mapping[str, Any], shift: bool) -> Tensor:
    """One loss per example ``[B]`` from a model's ``output`` and the batch's ``labels``
    (see the module doc); a ValueError says what is missing."""
    logits = model_scores(output)
    labels = batch.get("labels")
    if labels is None:
        labels = batch.get("label")
    if not isinstance(logits, Tensor) or labels is None:
        what = "no logits" if not isinstance(logits, Tensor) else "no labels in the batch"
        raise ValueError(
            f"the model's output has {what}, from which a loss per example is computed: give "
            "the batches labels, or pass per_example_loss=(outputs, inputs) -> Tensor[B]"
        )
    logits = logits.float()
    if logits.dim() == 3 and labels.dim() == 2:
        if shift:
            # the labels move left, not the logits: slicing ``[B, T, V]`` logits would copy
            # them (and their gradient) once more per step; the last position has no label
            labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        mask = labels != -100
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view_as(labels)
        return ce.sum(1) / mask.sum(1).clamp_min(1)
    if logits.dim() == 2 and labels.dim() == 1:
        if logits.shape[1] == 1 and labels.is_floating_point():
            return (logits.squeeze(1) - labels.float()) ** 2
        return F.cross_entropy(logits, labels.long(), reduction="none")
    raise ValueError(
        f"cannot read a loss per example from logits {tuple(logits.shape)} and labels "
        f"{tuple(labels.shape)}: pass per_example_loss=(outputs, inputs) -> Tensor[B]"
    )


def meta_loss_fn(
    meta_loss: Callable[[Any, Any], Tensor] | None, shift: bool
) -> Callable[[Any, Mapping[str, Any]], Tensor]:
    """``(output, batch) -> scalar``: the user's ``meta_loss(outputs, inputs)``, else the
    model's own loss (its ``loss`` output, computed from the batch's labels), else the mean of
    the per-example losses."""

    def loss(output: Any, batch: Mapping[str, Any]) -> Tensor:
        if meta_loss is not None:
            return meta_loss(output, batch["x"])
        own = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(own, Tensor) and own.dim() == 0:
            return own.float()
        return per_example_loss(output, batch, shift).mean()

    return loss


def model_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its labels: what the model is called with when the loss is computed
    here (a model given labels computes its own loss as well, for nothing)."""
    return {k: v for k, v in inputs.items() if k not in ("labels", "label")}


def as_batch(inputs: Mapping[str, Any], domain: Tensor | None = None) -> dict[str, Any]:
    """The batch as the library's functional helpers take it: the model's keyword inputs
    under ``x``, the labels beside them."""
    batch: dict[str, Any] = {"x": model_inputs(inputs)}
    for key in ("labels", "label"):
        if key in inputs:
            batch[key] = inputs[key]
    if domain is not None:
        batch["domain"] = domain
    return batch


def as_meta_batch(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A meta batch for the functional helpers: the model is called with every input, labels
    included (its own loss is the default meta loss), and the labels sit beside them too."""
    batch: dict[str, Any] = {"x": dict(inputs)}
    for key in ("labels", "label"):
        if key in inputs:
            batch[key] = inputs[key]
    return batch


def inputs_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The original inputs back from :func:`as_batch` (for a user's per-example loss)."""
    out = dict(batch["x"])
    for key in ("labels", "label"):
        if key in batch:
            out[key] = batch[key]
    return out


def example_loss_fn(
    user: Callable[[Any, Any], Tensor] | None, shift: bool
) -> Callable[[Any, Mapping[str, Any]], Tensor]:
    """``(output, batch) -> [B]`` for the functional helpers: the user's
    ``per_example_loss(outputs, inputs)`` or :func:`per_example_loss`."""

    def loss(output: Any, batch: Mapping[str, Any]) -> Tensor:
        if user is not None:
            return user(output, inputs_of(batch))
        return per_example_loss(output, batch, shift)

    return loss


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
