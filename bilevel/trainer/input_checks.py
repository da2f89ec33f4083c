"""Whether the data fit the model: labels in range, token ids in the vocabulary, sequences
within the position embeddings.

Each of these mistakes fails only when a batch happens to draw the bad row, as an IndexError on
the CPU and as a device-side assert that ends the process on a GPU; checked before training,
each is one line naming the set and the column (one host read per column).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.data.domain_data import DomainData
from bilevel.errors import ConfigError
from bilevel.losses import classification, lm

__all__ = [
    "CLASS_LOSSES",
    "check_labels",
    "check_step_positions",
    "check_token_ids",
    "input_embedding",
    "max_positions",
]

Loss = Callable[[Any, Any], Tensor]

#: losses whose integer labels ``y`` index the model's last output dimension
CLASS_LOSSES = {
    classification.per_example_cross_entropy,
    classification.cross_entropy,
    lm.per_sequence_token_cross_entropy,
    lm.token_cross_entropy,
}


def _sets(data: DomainData) -> list[tuple[str, Any]]:
    """The data's train, meta and test columns, each with the field that names it."""
    return [("data.train", data.train), ("data.meta", data.meta), ("data.test", data.test)]


def _wrapped(module: nn.Module) -> list[Any]:
    """The model and the Hugging Face model it may wrap (as ``encoder`` or ``lm``)."""
    return [
        m
        for m in (module, getattr(module, "encoder", None), getattr(module, "lm", None))
        if m is not None
    ]


def input_embedding(module: nn.Module) -> nn.Embedding | None:
    """The model's token embedding, where it names one the Hugging Face way
    (``get_input_embeddings()``, on the model or on the ``encoder`` / ``lm`` it wraps);
    ``None`` for a model that does not (its inputs are not checked: which of several
    embeddings reads ``x`` is the model's business)."""
    for candidate in _wrapped(module):
        get = getattr(candidate, "get_input_embeddings", None)
        if not callable(get):
            continue
        try:
            embedding = get()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(embedding, nn.Embedding):
            return embedding
    return None


def max_positions(module: nn.Module) -> int | None:
    """How many positions the model has learned embeddings for: a ``max_positions`` attribute
    (TinyGPT), else the rows of an embedding table of positions (BERT's
    ``position_embeddings``, GPT-2's ``wpe``), capped by the Hugging Face config's
    ``max_position_embeddings``. ``None`` for a model without such a table (rotary positions,
    as in Llama-like models, go past their training length without failing)."""
    for candidate in _wrapped(module):
        limit = getattr(candidate, "max_positions", None)
        if isinstance(limit, int):
            return limit
    configured = [
        getattr(getattr(c, "config", None), "max_position_embeddings", None)
        for c in _wrapped(module)
    ]
    configured = [n for n in configured if isinstance(n, int)]
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(child, nn.Embedding) and ("position" in leaf or leaf == "wpe"):
            return min([child.num_embeddings, *configured])
    return None


def check_token_ids(module: nn.Module, data: DomainData) -> None:
    """Token ids (an integer ``x``, or ``x["input_ids"]``) of the train, meta and test sets
    must index the model's input embedding, and their sequences must fit its position
    embeddings: either failed only when a batch drew it, as an IndexError or a shape error on
    the CPU and as a device-side assert that ends the process on a GPU (a tokenizer other than
    the model's, e.g. ``data.tokenizer`` set apart from ``model.path``; a ``data.max_len``
    past the model's 512 positions). One host read per column, before training."""
    embedding, limit = input_embedding(module), max_positions(module)
    set_vocabulary = getattr(data, "set_vocabulary", None)
    if embedding is not None and callable(set_vocabulary):  # corpora check every batch read
        set_vocabulary(embedding.num_embeddings)
    if embedding is None and limit is None:
        return
    for field, columns in _sets(data):
        x = columns.get("x") if isinstance(columns, Mapping) else None
        ids, name = (x.get("input_ids"), "x['input_ids']") if isinstance(x, Mapping) else (x, "x")
        if not isinstance(ids, Tensor) or ids.numel() == 0 or ids.dtype == torch.bool:
            continue
        if ids.is_floating_point() or ids.is_complex():
            continue
        if limit is not None and ids.dim() >= 2 and ids.shape[-1] > limit:
            raise ConfigError(
                field,
                f"column {name} holds sequences of {ids.shape[-1]} tokens but the model has "
                f"position embeddings for {limit}: shorten them (e.g. data.max_len<={limit})",
            )
        if embedding is None:
            continue
        size = embedding.num_embeddings
        bad = (ids < 0) | (ids >= size)
        if bool(bad.any()):
            raise ConfigError(
                field,
                f"column {name} holds token ids outside [0, {size}) (e.g. {int(ids[bad][0])}) "
                f"but the model's input embedding has {size} rows: tokenize with the model's "
                "own tokenizer (data.tokenizer, model.path), or fix the model's vocabulary size",
            )


def check_step_positions(module: nn.Module, data: DomainData) -> None:
    """``x["step_positions"]`` (where a step head reads each step's score) must index a token of
    ``x["input_ids"]``: a position past the sequence failed only when a batch drew it (an
    IndexError from ``gather`` on the CPU, a device-side assert on a GPU). Negative positions
    are padding (the step head reads them at 0 and the step mask drops them). For the
    library's step head they must be int64, the only index dtype its ``gather`` takes (a
    model of one's own may read them as it likes)."""
    step_head = any(getattr(m, "head_kind", None) == "step" for m in module.modules())
    for field, columns in _sets(data):
        x = columns.get("x") if isinstance(columns, Mapping) else None
        if not isinstance(x, Mapping):
            continue
        positions, ids = x.get("step_positions"), x.get("input_ids")
        if not isinstance(positions, Tensor) or not isinstance(ids, Tensor) or ids.dim() < 2:
            continue
        if step_head and positions.dtype != torch.int64:  # "Expected dtype int64 for index"
            raise ConfigError(
                field,
                f"column x['step_positions'] is {str(positions.dtype).removeprefix('torch.')} "
                "but the step head gathers with int64 positions: convert it with .long()",
            )
        if positions.numel() and int(positions.max()) >= ids.shape[-1]:
            raise ConfigError(
                field,
                f"column x['step_positions'] holds position {int(positions.max())} but the "
                f"sequences in x['input_ids'] have {ids.shape[-1]} tokens: each step's position "
                "must index a token of its sequence",
            )


def check_labels(output: Any, losses: tuple[Loss, ...], data: DomainData) -> None:
    """With the library's cross-entropy losses, every integer label ``y`` of the train, meta
    and test sets must index one of the model's outputs (or be -100, ignored): a label out of
    range fails only when a batch draws it, as an IndexError on the CPU and as a device-side
    assert that ends the process on a GPU. A float ``y`` with one value per example is a class
    index stored as float (torch: ``expected target dtype to be Long``), and an int32 or bool
    one the same index in a dtype the losses do not take. One host read per column, before
    training."""
    used = {getattr(f, "func", f) for f in losses}
    if not used & CLASS_LOSSES or not isinstance(output, Tensor) or output.dim() < 2:
        return
    classes = output.shape[-1]
    for field, columns in _sets(data):
        y = columns.get("y") if isinstance(columns, Mapping) else None
        if not isinstance(y, Tensor) or y.numel() == 0:
            continue
        if y.is_floating_point():
            if y.dim() == output.dim() - 1:  # one value per example: meant as class indices
                raise ConfigError(
                    field,
                    f"column 'y' is {str(y.dtype).removeprefix('torch.')} but the cross-entropy "
                    "losses read it as class indices: convert it with y.long() (soft targets "
                    f"are a {output.dim()}-d column of probabilities, one per output)",
                )
            continue
        if y.dtype not in (torch.int64, torch.uint8):  # torch: "expected ... Long or Byte"
            raise ConfigError(
                field,
                f"column 'y' is {str(y.dtype).removeprefix('torch.')} but the cross-entropy "
                "losses take class indices as int64: convert it with y.long()",
            )
        if y.dim() != output.dim() - 1:  # e.g. [N, 1] labels from a table: torch's 0D/1D error
            want = ("N", *(["T"] * (output.dim() - 2)))
            hint = " (e.g. y.squeeze(-1))" if y.dim() == output.dim() and y.shape[-1] == 1 else ""
            raise ConfigError(
                field,
                f"column 'y' has shape {tuple(y.shape)} but the cross-entropy losses read one "
                f"class index per output row, shape [{', '.join(want)}] for the model's "
                f"{output.dim()}-d output: reshape the labels{hint}",
            )
        bad = ((y < 0) | (y >= classes)) & (y != -100)
        if bool(bad.any()):
            raise ConfigError(
                field,
                f"column 'y' holds labels outside [0, {classes}) (e.g. {int(y[bad][0])}) but "
                f"the model has {classes} outputs: fix the labels or the model's output size",
            )
