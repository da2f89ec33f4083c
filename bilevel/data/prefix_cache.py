"""Cache a model's frozen prefix: compute it once per example, train only what follows.

Many bilevel runs train the top of a large pretrained model: the embeddings and lower layers
are frozen, yet every inner step, every meta batch and every evaluation runs them again. When
those layers are frozen *and deterministic* (no dropout), their output for an example never
changes, so it can be computed once, before training, and stored in place of the example's input.
The inner steps, the hypergradient and the evaluations then run only the trainable suffix: the
same losses and the same gradients, at the cost of the suffix (a 6-layer encoder with 5 frozen
layers trains at about a fifth of the cost; measured in ``experiments/prm_text``).

A model takes part by having ``prefix(x) -> cached`` (the frozen part, on a batch's ``x``) and a
``forward`` that accepts ``cached`` in place of ``x`` (as keyword arguments when it is a dict).
:class:`bilevel.models.SplitModel` (any ``prefix`` and ``suffix`` module of one's own) and
:class:`bilevel.models.HFClassifier` with ``frozen_layers=k`` do. :func:`cache_prefix` replaces the
``x`` column of every split (train, meta, test, val) by the prefix's output, and checks on the
first rows that the model gives the same output from the cache as from the raw input.

Memory: the cache holds the prefix's output for every example (for an encoder, ``[N, T, H]``
floats: 2,000 sequences of 64 tokens at width 384 are 197 MB), on the data's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
from bilevel.data.columns import Columns, chunks, num_rows, take
from bilevel.data.domain_data import DomainData
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch, model_scores

__all__ = ["cache_prefix", "has_prefix"]

SPLITS = ("train", "meta", "test", "val")


def has_prefix(model: nn.Module) -> bool:
    """Whether ``model`` can have its prefix cached (it has ``prefix(x)``)."""
    return callable(getattr(model, "prefix", None))


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], Mapping):
        return {k: _concat([p[k] for p in parts]) for k in parts[0]}
    raise ConfigError(
        "model.prefix",
        f"must return a tensor or a dict of tensors, got {type(parts[0]).__name__}",
    )


def _check_frozen(model: nn.Module) -> None:
    params = getattr(model, "prefix_parameters", None)
    if not callable(params):
        return
    trained = [name for name, p in params() if p.requires_grad]
    if trained:
        raise ConfigError(
            "trainer.cache_prefix",
            f"the model's prefix has trainable parameters ({', '.join(trained[:3])}"
            f"{', ...' if len(trained) > 3 else ''}): a cached output would go stale as they "
            "train; freeze them, or run without the cache",
        )


@torch.no_grad()
def _prefix_of(model: nn.Module, columns: Columns, batch_size: int, device: torch.device) -> Any:
    parts = []
    for chunk in chunks(columns, batch_size):
        x = chunk["x"]
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, Mapping) else x.to(device)
        out = model.prefix(x)
        parts.append(out)
    return _concat(parts)


@torch.no_grad()
def _check_same(model: nn.Module, raw: Columns, cached: Columns, rows: int, device) -> None:
    """The model's output from the cache equals its output from the raw input (first rows)."""
    index = torch.arange(min(rows, num_rows(raw)))
    with module_state.evaluation(model):
        want = model_scores(forward_batch(model, _to(take(raw, index), device)))
        got = model_scores(forward_batch(model, _to(take(cached, index), device)))
    if not (isinstance(want, Tensor) and isinstance(got, Tensor)) or want.shape != got.shape:
        raise ConfigError(
            "trainer.cache_prefix",
            "the model's output from its cached prefix differs in kind or shape from its output "
            "on the raw input: its forward must accept what prefix() returns",
        )
    scale = want.abs().max().clamp_min(1.0)
    gap = float((want - got).abs().max() / scale)
    if gap > 1e-4:
        raise ConfigError(
            "trainer.cache_prefix",
            f"the model's output from its cached prefix differs from its output on the raw "
            f"input by {gap:.2e} (relative): the prefix is not deterministic (dropout in "
            "it?) or forward() does not continue where prefix() stops",
        )


def _to(columns: Columns, device: torch.device) -> Columns:
    def move(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: move(u) for k, u in v.items()}
        return v.to(device) if isinstance(v, Tensor) else v

    return {k: move(v) for k, v in columns.items()}


def cache_prefix(
    model: nn.Module,
    data: DomainData,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    check_rows: int = 4,
) -> DomainData:
    """``data`` with every split's ``x`` replaced by ``model.prefix(x)``, computed once.

    Args:
        model: a model with ``prefix(x)`` whose ``forward`` accepts the prefix's output in
            place of ``x`` (see the module doc); its prefix must be frozen.
        data: in-memory data (a corpus read lazily from disk cannot be cached).
        device: where the prefix runs (default: the model's); the cache goes back to the
            device each split's ``x`` was on.
        batch_size: examples per prefix call.
        check_rows: rows on which the cached and the raw output are compared.

    Returns:
        A new :class:`DomainData` (the original is left as it is); its ``info["prefix_cache"]``
        records the cached splits and the cache's size in MB.
    """
    if not has_prefix(model):
        raise ConfigError(
            "trainer.cache_prefix",
            f"the model ({type(model).__name__}) has no prefix(x) to cache: use "
            "bilevel.models.SplitModel(prefix, suffix), or a model with frozen_layers",
        )
    if type(data).train_sampler is not DomainData.train_sampler:
        raise ConfigError(
            "trainer.cache_prefix",
            "the data is read from disk as it trains (a corpus): only in-memory data is cached",
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    _check_frozen(model)
    changed: dict[str, Any] = {}
    size = 0
    with module_state.evaluation(model):
        for split in SPLITS:
            columns = getattr(data, split)
            if columns is None or "x" not in columns:
                continue
            home = next(iter(_leaves(columns["x"]))).device
            cached_x = _to({"x": _prefix_of(model, columns, batch_size, device)}, home)["x"]
            cached = {**columns, "x": cached_x}
            if split == "train":
                _check_same(model, columns, cached, check_rows, device)
            size += sum(t.numel() * t.element_size() for t in _leaves(cached_x))
            changed[split] = cached
    info = {
        **data.info,
        "prefix_cache": {"splits": list(changed), "megabytes": round(size / 2**20, 1)},
    }
    return replace(data, **changed, info=info)


def _leaves(x: Any) -> list[Tensor]:
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    return [x] if isinstance(x, Tensor) else []
