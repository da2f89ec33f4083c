"""What the trainer checks before it trains: its arguments, the losses' shapes, the solver.

Each mistake becomes one line naming the argument or field (:class:`ConfigError` or
``TypeError``) instead of a failure deep inside the first step: a library model or loss that
does not fit the data says which shape it reads; a bug inside the user's own model or loss
keeps its traceback. Whether the data's labels and token ids fit the model is
:mod:`bilevel.trainer.input_checks`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
from bilevel.data.columns import Columns, num_rows, take, tensors, to_device
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import classification_metrics, default_evaluator, output_logits
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch
from bilevel.trainer.config import TrainerConfig
from bilevel.trainer.input_checks import check_labels, check_step_positions, check_token_ids

__all__ = [
    "choose_evaluator",
    "check_arguments",
    "check_batch_sizes",
    "check_losses",
    "outer_gradient",
]

Loss = Callable[[Any, Any], Tensor]


def check_arguments(model, weights, solver, data, config) -> tuple[Any, TrainerConfig]:
    """Name the argument that is not what the trainer needs (each failed deep inside before:
    ``'dict' object has no attribute 'validate'``, a bare ``StopIteration``); a solver's name
    stands for ``build(name)`` and a dict for ``TrainerConfig(**dict)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ConfigError("model", "the model has no parameters to train")
    if not isinstance(weights, nn.Module) or not callable(getattr(weights, "value", None)):
        raise TypeError(
            "weights must be a bilevel.DomainWeights (or a MetaWeightNet), got "
            f"{type(weights).__name__}"
        )
    half = [p for p in weights.parameters() if p.dtype == torch.float16]
    if half:
        # Adam's eps (1e-8) is 0 in float16 and squared gradients underflow: on the default
        # problem two domains went to weight 0.0 where float32 and bfloat16 agree on 0.04/0.09
        raise ConfigError(
            "weights",
            "float16 weights train wrong (Adam's eps and squared hypergradients round to 0 in "
            "float16): keep them float32 (the default) or bfloat16, whatever the model's dtype",
        )
    if not isinstance(data, DomainData):
        raise TypeError(
            f"data must be a bilevel.data.DomainData (train, meta, test columns and domain "
            f"names), got {type(data).__name__}"
        )
    if isinstance(solver, str):
        from bilevel.solvers import build

        solver = build(solver)
    if config is None:
        config = TrainerConfig()
    elif isinstance(config, Mapping):
        config = TrainerConfig.from_mapping(config)
    elif not isinstance(config, TrainerConfig):
        raise TypeError(f"config must be a bilevel.TrainerConfig, got {type(config).__name__}")
    return solver, config


def check_loss_callable(field: str, fn: Any) -> None:
    """A loss is called as ``fn(output, batch)``: say so before training when the built object
    is not callable or its signature cannot take those two arguments (e.g. a ``_target_`` that
    names another function), instead of a ``TypeError`` from inside the first step."""
    expected = "a callable (output, batch) -> Tensor"
    if not callable(fn):
        raise ConfigError(field, f"must be {expected}, got {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: let the call decide
        return
    try:
        signature.bind(None, None)
    except TypeError as err:
        name = getattr(getattr(fn, "func", fn), "__qualname__", repr(fn))
        raise ConfigError(
            field, f"{name} cannot take the two arguments (output, batch) of a loss: {err}"
        ) from None


def check_batch_sizes(config: TrainerConfig, world_size: int) -> None:
    """Under torchrun each rank draws ``batch_size // world_size`` training rows: a batch
    smaller than the number of ranks would leave every rank with none (the sampler's
    ValueError, raised on every rank with a traceback each)."""
    if config.batch_size < world_size:
        raise ConfigError(
            "trainer.batch_size",
            f"{config.batch_size} is smaller than the {world_size} ranks, which each draw "
            f"batch_size // {world_size} rows: use at least {world_size}",
        )


def check_losses(
    module: nn.Module, inner_loss: Loss, outer_loss: Loss, data: DomainData, device
) -> bool:
    """One forward pass of each loss on a few rows: an inner loss must return one value per
    example and an outer loss a scalar; the labels are checked against the model's outputs
    (:func:`check_labels`), and a few test rows go through the model too. The passes leave
    the model's buffers as they were.

    The inner loss must carry a gradient back to the model's output (detached, or built from
    ``argmax`` and comparisons, it would train nothing, silently). Returns whether the outer
    loss does: only the methods that differentiate it need that (:func:`outer_gradient`)."""
    check_loss_callable("inner_loss", inner_loss)
    check_loss_callable("outer_loss", outer_loss)
    check_token_ids(module, data)
    check_step_positions(module, data)
    with torch.no_grad(), module_state.buffers_kept(module):  # a check, not a training step
        batch = _first_rows(data.train, 4, device)
        rows = num_rows(batch)
        output = _forward(module, batch, "data.train")
        check_labels(output, (inner_loss, outer_loss), data)
        out, differentiable = _loss(inner_loss, "inner_loss", output, batch, "data.train")
        if not isinstance(out, Tensor) or out.shape != (rows,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(
                "inner_loss",
                f"must return one loss per example (shape ({rows},) for {rows} rows), got {shape}",
            )
        if differentiable is False:
            raise ConfigError(
                "inner_loss",
                "carries no gradient back to the model's output (detached, or built from "
                "argmax / comparisons), so the model would not train: return a differentiable "
                "loss per example",
            )
        meta = _first_rows(data.meta, 16, device)
        value, outer_differentiable = _loss(
            outer_loss, "outer_loss", _forward(module, meta, "data.meta"), meta, "data.meta"
        )
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                "outer_loss",
                f"must return a scalar (one meta loss for the batch), got shape {shape}; "
                "reduce it, e.g. with .mean()",
            )
        if isinstance(data.test, Mapping) and "x" in data.test and num_rows(data.test):
            # the test set is used only at the end: a mistake there would cost the whole run
            output = _forward(module, _first_rows(data.test, 4, device), "data.test")
            if data.evaluate is classification_metrics:
                output_logits(output)  # the class scores it reads are in this output
        return outer_differentiable is not False


def outer_gradient(method_name: str) -> ConfigError:
    """The error for an outer loss without a gradient under a method that differentiates it."""
    return ConfigError(
        "outer_loss",
        "carries no gradient back to the model's output (detached, or built from argmax / "
        f"comparisons, e.g. an accuracy), so {method_name}'s hypergradient would be zero and "
        "the weights would never move: use a differentiable meta loss (e.g. cross entropy; "
        "report accuracy through the data's evaluate), or trainer.learn_weights=false",
    )


def _gradient_copy(output: Any) -> Any:
    """A copy of the model's output whose floating tensors are leaves that require grad (cloned,
    so that a loss that writes into its input still may), for telling whether a loss depends
    differentiably on the output without running the model with a graph; ``None`` for an
    output of another kind."""
    if isinstance(output, Tensor):
        return output.detach().requires_grad_().clone() if output.is_floating_point() else None
    if not isinstance(output, Mapping):
        return None
    leaf = copy.copy(output)  # a Hugging Face ModelOutput, a dict
    for key, item in output.items():
        if isinstance(item, Tensor) and item.is_floating_point():
            leaf[key] = item.detach().requires_grad_().clone()
    return leaf


def _library_part(part: Any) -> bool:
    """Whether a model or loss is one of the library's own (through ``functools.partial`` and
    Hydra's wrappers): their ValueErrors describe bad input (a model or loss that does not fit
    the data) and become one line; a user's own keeps its traceback."""
    while getattr(part, "func", None) is not None:
        part = part.func
    package = (getattr(part, "__module__", None) or "").split(".")[0]
    return package in ("bilevel", "bilevel_experiments")


def _first_rows(columns: Columns, n: int, device) -> Columns:
    """The first ``n`` rows of ``columns`` on ``device`` (taken where the columns are, so only
    those rows are copied)."""
    here = next(tensors(columns)).device
    return to_device(take(columns, torch.arange(min(n, num_rows(columns)), device=here)), device)


_SCALAR_NAMES = {
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}
"""How torch's dtype errors name an integer dtype (``mat1 and mat2 must have the same dtype,
but got Long and Float``)."""


def _forward(module: nn.Module, batch: Any, field: str) -> Any:
    """The model's output on ``batch``; a failure that comes from inputs of another dtype than
    the model's parameters (float64 or integer data into a float32 model: ``mat1 and mat2 must
    have the same dtype``) becomes one line naming the column; any other failure keeps its
    traceback. An integer column is named only where torch's message names its type, since
    token ids are integers by design."""
    try:
        return forward_batch(module, batch)
    except ValueError as err:
        if not _library_part(module):
            raise
        raise ConfigError("model", f"{err} (in {field}): pick a model that fits the data") from None
    except RuntimeError as err:
        params = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if len(params) != 1:
            raise
        (want,) = params
        x = batch["x"]
        columns = list(x.items()) if isinstance(x, Mapping) else [("x", x)]
        for name, column in columns:
            if not isinstance(column, Tensor) or column.dtype == want:
                continue
            scalar = _SCALAR_NAMES.get(column.dtype)
            if column.is_floating_point() or (scalar is not None and scalar in str(err)):
                dtype = str(column.dtype).removeprefix("torch.")
                raise ConfigError(
                    field,
                    f"column {name!r} is {dtype} but the model's parameters are "
                    f"{str(want).removeprefix('torch.')}: convert the data (e.g. "
                    f"x.to({want}))"
                    + (f" or the model (e.g. model.to({column.dtype}))" if scalar is None else ""),
                ) from None
        raise


def _loss(
    loss: Loss, name: str, output: Any, batch: Columns, field: str
) -> tuple[Any, bool | None]:
    """``loss(output, batch)``, called once, on a copy of the output that requires grad, and
    whether its value carries a gradient back to the output (``None``: cannot tell). A
    ``KeyError`` for a column the batch does not have (a meta set without the labels the outer
    loss reads) becomes one line naming the set and its columns."""
    with torch.enable_grad():
        leaf = _gradient_copy(output)
        try:
            value = loss(output if leaf is None else leaf, batch)
        except ValueError as err:  # the library's losses say which shapes they read
            if not _library_part(loss):
                raise
            raise ConfigError(name, f"{err} (in {field})") from None
        except KeyError as err:
            key = err.args[0] if err.args else None
            if not isinstance(key, str) or key in batch:
                raise
            raise ConfigError(
                field,
                f"{name} reads column {key!r}, which this set does not have (its columns: "
                f"{', '.join(map(str, batch))}): add it, or use a loss that needs only those",
            ) from None
    if leaf is None:
        return value, None
    return value, isinstance(value, Tensor) and value.requires_grad


def choose_evaluator(module: nn.Module, data: DomainData, device) -> tuple[Any, list[str]]:
    """The function that scores the test (and validation) set, and what to say about it: the
    data's ``evaluate``; else the library's metrics that the targets call for
    (:func:`~bilevel.data.evaluate.default_evaluator`: classification, language modelling,
    regression), said in a note; else none, and a note that the set is not scored (a test set
    given without ``evaluate`` was dropped without a word). ``evaluate`` without a set to score
    is a note too."""
    sets = [(name, c) for name, c in (("test", data.test), ("val", data.val)) if c is not None]
    if data.evaluate is not None:
        if not sets:
            return data.evaluate, [
                "data.evaluate is given but the data has no test (or val) set: nothing is "
                "scored; give the data a test set"
            ]
        return data.evaluate, []
    if not sets:
        return None, []
    name, columns = sets[0]
    if not (isinstance(columns, Mapping) and "x" in columns and num_rows(columns)):
        return None, []
    with torch.no_grad(), module_state.buffers_kept(module):
        rows = _first_rows(columns, 4, device)
        output = _forward(module, rows, f"data.{name}")
    chosen = default_evaluator(output, rows)
    which = " and ".join(n for n, _ in sets)
    if chosen is None:
        return None, [
            f"the {which} set has no data.evaluate and its targets are not ones the library "
            "can score (integer classes, next tokens, or float regression targets): it is not "
            "scored; give the data an evaluate function, (model, columns, device) -> {metric: "
            "number}"
        ]
    return chosen, [
        f"the {which} set is scored with {chosen.__name__} (the library's, for its targets: "
        "data.evaluate is not given)"
    ]


def rows_for(weights: Any, data: DomainData) -> DomainData:
    """``data`` with the ``row`` column that weights stored per example read
    (:meth:`DomainData.with_rows`), checked against the weights' size; ``data`` as it is for
    other weights."""
    if not getattr(weights, "needs_rows", False):
        return data
    kind = getattr(weights, "parametrization", type(weights).__name__)
    if type(data).train_sampler is not DomainData.train_sampler:
        raise ConfigError(
            "weights",
            f"weights={kind} keeps a weight per training row; a corpus read from disk has no "
            "fixed rows (use domain weights, or weights=meta_weight_net)",
        )
    n = num_rows(data.train)
    if getattr(weights, "size", n) != n:
        raise ConfigError("weights.size", f"is {weights.size} but the training data has {n} rows")
    return data.with_rows()
