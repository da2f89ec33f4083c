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

Across runs: with ``store`` (``trainer.prefix_cache_dir``) each split's cache is also kept in a
folder, in a file named by the SHA-256 of what determines it (the prefix's parameters, the
split's inputs, the batch size, the library and torch versions, the device type). A sweep over
methods or hyperparameters on the same data and base model computes the prefix once; the other
runs read it (and check its first rows against the raw input, as a fresh cache is checked).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
from bilevel.data.columns import Columns, chunks, num_rows, take
from bilevel.data.domain_data import DomainData
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch, model_scores

__all__ = ["cache_prefix", "has_prefix", "store_key"]

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


def _bytes_of(t: Tensor) -> bytes:
    """A tensor's raw bytes (any dtype, bf16 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _prefix_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """What the prefix's output depends on: its parameters where the model names them
    (``prefix_parameters()``), otherwise every parameter and buffer of the model."""
    params = getattr(model, "prefix_parameters", None)
    if callable(params):
        yield from params()
        return
    yield from model.named_parameters()
    yield from model.named_buffers()


def store_key(model: nn.Module, x: Any, batch_size: int, device: torch.device) -> str:
    """The SHA-256 (hex) of what a split's cached prefix depends on: the model's class, its
    prefix's tensors, the split's inputs ``x`` (a tensor or a dict of tensors), the batch size
    of the prefix calls (a batch's size can move the last bits of a matmul), the library's and
    torch's versions and the device type."""
    try:  # the installed library's version (the package itself sits above this layer)
        library = metadata.version("bilevel")
    except metadata.PackageNotFoundError:
        library = "unknown"
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{library}|".encode())
    h.update(f"{torch.__version__}|{device.type}|{batch_size}|".encode())
    for name, t in _prefix_tensors(model):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(_bytes_of(t))
    leaves = sorted(x.items()) if isinstance(x, Mapping) else [("x", x)]
    for name, t in leaves:
        if isinstance(t, Tensor):
            h.update(f"in:{name}:{t.dtype}:{tuple(t.shape)}|".encode())
            h.update(_bytes_of(t))
    return h.hexdigest()


def _save(value: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then renamed: a run killed while
    writing leaves no half file under the final name (another run would read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(value, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, home: torch.device) -> Any:
    try:
        return torch.load(path, map_location=home, weights_only=True)
    except Exception:  # unreadable (a disk that filled, another version's file): recompute
        return None


@torch.no_grad()
def _output_gap(model: nn.Module, raw: Columns, cached: Columns, rows: int, device) -> float:
    """The largest relative difference between the model's output from the cache and from the
    raw input on the first rows (``inf`` where their kinds or shapes differ)."""
    index = torch.arange(min(rows, num_rows(raw)))
    with module_state.evaluation(model):
        want = model_scores(forward_batch(model, _to(take(raw, index), device)))
        got = model_scores(forward_batch(model, _to(take(cached, index), device)))
    if not (isinstance(want, Tensor) and isinstance(got, Tensor)) or want.shape != got.shape:
        return float("inf")
    scale = want.abs().max().clamp_min(1.0)
    return float((want - got).abs().max() / scale)


def _check_same(model: nn.Module, raw: Columns, cached: Columns, rows: int, device) -> None:
    """The model's output from the cache equals its output from the raw input (first rows)."""
    gap = _output_gap(model, raw, cached, rows, device)
    if gap == float("inf"):
        raise ConfigError(
            "trainer.cache_prefix",
            "the model's output from its cached prefix differs in kind or shape from its output "
            "on the raw input: its forward must accept what prefix() returns",
        )
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
    store: str | Path | None = None,
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
        store: a folder that keeps each split's cache across runs (see the module doc); a
            split found there is read instead of computed, after the same check on its first
            rows (one that fails it is computed again and replaced).

    Returns:
        A new :class:`DomainData` (the original is left as it is); its ``info["prefix_cache"]``
        records the cached splits, the cache's size in MB and, with ``store``, which splits
        were read from it and which were written.
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
    folder = Path(store) if store is not None else None
    changed: dict[str, Any] = {}
    size = 0
    read, written = [], []
    with module_state.evaluation(model):
        for split in SPLITS:
            columns = getattr(data, split)
            if columns is None or "x" not in columns:
                continue
            home = next(iter(_leaves(columns["x"]))).device
            path = None
            cached_x = None
            if folder is not None:
                path = folder / f"{store_key(model, columns['x'], batch_size, device)}.pt"
                if path.is_file():
                    cached_x = _load(path, home)
                    # a file that does not continue the model as its raw input does (another
                    # code version of the same prefix) is computed again and replaced
                    if cached_x is not None and (
                        _output_gap(model, columns, {**columns, "x": cached_x}, check_rows, device)
                        > 1e-4
                    ):
                        cached_x = None
                    if cached_x is not None:
                        read.append(split)
            if cached_x is None:
                cached_x = _to({"x": _prefix_of(model, columns, batch_size, device)}, home)["x"]
                if split == "train":
                    _check_same(model, columns, {**columns, "x": cached_x}, check_rows, device)
                if path is not None:
                    _save(_to({"x": cached_x}, torch.device("cpu"))["x"], path)
                    written.append(split)
            size += sum(t.numel() * t.element_size() for t in _leaves(cached_x))
            changed[split] = {**columns, "x": cached_x}
    record: dict[str, Any] = {"splits": list(changed), "megabytes": round(size / 2**20, 1)}
    if folder is not None:
        record.update(store=str(folder), read=read, written=written)
    info = {**data.info, "prefix_cache": record}
    return replace(data, **changed, info=info)


def _leaves(x: Any) -> list[Tensor]:
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    return [x] if isinstance(x, Tensor) else []
