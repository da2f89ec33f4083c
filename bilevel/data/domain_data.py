"""``DomainData``: what a data builder returns: K named training domains, meta and test sets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bilevel.data.columns import Columns, leaves, num_rows, take, tensors, to_device
from bilevel.data.samplers import DomainSampler
from bilevel.errors import ConfigError

__all__ = ["DomainData", "Evaluator"]

Evaluator = Callable[[nn.Module, Columns, torch.device], dict[str, float]]


@dataclass
class DomainData:
    """In-memory data of one bilevel problem.

    Attributes:
        names: the K domain names; ``train["domain"]`` indexes into them.
        train: training columns, ``"x"`` (model input), the targets the losses read (e.g. ``"y"``)
            and ``"domain"`` (int64 ``[N]``).
        meta: the meta set the outer loss is measured on (same columns, no ``"domain"`` needed).
        test: held-out columns for the final metrics (optional).
        evaluate: ``(model, columns, device) -> {metric: value}`` for the test set.
        model_kwargs: sizes the model factory may need (``in_dim``, ``out_dim``, ``vocab_size``..);
            only the keyword arguments the factory accepts are passed.
        info: anything worth recording in the summary (e.g. the noise of each domain).
        val: a validation set scored like the test set (``summary.json``'s ``val``), apart
            from the meta set that the outer loop fits: what a sweep should tune on
            (``optimized_metric=val.<metric>``).
    """

    names: list[str]
    train: Columns
    meta: Columns | None
    test: Columns | None = None
    evaluate: Evaluator | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    val: Columns | None = None

    def train_sampler(
        self,
        num_domains: int,
        batch_size: int,
        sampling: str,
        seed: int,
        rank: int,
        world_size: int,
        temperature: float,
        device: torch.device,
    ) -> DomainSampler:
        """The sampler the trainer draws training batches from: for columns in memory, the
        device-side :class:`~bilevel.data.samplers.DomainSampler` (corpora on disk answer with
        a sampler over their streams)."""
        return DomainSampler(
            to_device(self.train, device),
            num_domains,
            batch_size,
            sampling,
            seed,
            rank,
            world_size,
            temperature=temperature,
        )

    def domain_sizes(self) -> list[int]:
        domain = self.train["domain"]
        return torch.bincount(domain.cpu(), minlength=len(self.names)).tolist()

    def with_rows(self) -> DomainData:
        """This data with a ``row`` column in ``train`` (int64 ``[N]``, 0..N-1): the row index
        a batch carries for weights stored per example (``weights=instance_table``)."""
        n = num_rows(self.train)
        device = next(tensors(self.train)).device
        rows = torch.arange(n, dtype=torch.int64, device=device)
        return replace(self, train={**self.train, "row": rows})

    def subset(self, names: list[str]) -> DomainData:
        """The same data restricted to the domains ``names`` (in that order, re-indexed).

        Used by the top-level ``domains=[...]`` override, e.g. for a clean-only oracle run.
        """
        names = [str(n) for n in names]
        unknown = [n for n in names if n not in self.names]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                "domains", f"must list distinct domains of the data {self.names}, got {names}"
            )
        old = torch.tensor([self.names.index(n) for n in names])
        remap = torch.full((len(self.names),), -1, dtype=torch.int64)
        remap[old] = torch.arange(len(names))
        domain = self.train["domain"]
        rows = torch.nonzero(remap.to(domain.device)[domain] >= 0).flatten()
        train = take(self.train, rows)
        train["domain"] = remap.to(domain.device)[train["domain"]]
        info = {
            k: {n: v[n] for n in names if n in v} if isinstance(v, dict) else v
            for k, v in self.info.items()
        }
        return replace(self, names=names, train=train, info=info)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field for every way this data cannot train."""
        if isinstance(self.names, str | bytes):  # "abc" would be three domains a, b, c
            raise ConfigError("data.names", f"must be a list of names, got {self.names!r}")
        for where, columns in (
            ("data.train", self.train),
            ("data.meta", self.meta),
            ("data.test", self.test),
            ("data.val", self.val),
        ):
            if columns is not None and not isinstance(columns, Mapping):
                hint = ""
                if (
                    where == "data.train"
                    and isinstance(columns, list | tuple)
                    and all(isinstance(part, Mapping) for part in columns)
                ):
                    hint = (
                        ": for one dict of columns per domain, join them with "
                        "bilevel.data.domain_columns(parts) (it adds the domain column)"
                    )
                raise ConfigError(
                    where,
                    f"must be a dict of columns (name -> tensor, e.g. x, y, domain), got "
                    f"{type(columns).__name__}{hint}",
                )
        k = len(self.names)
        if k == 0:
            raise ConfigError("data.names", "no domains: at least one domain is needed")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ConfigError("data.names", f"duplicate domain names {dupes}")
        if self.train is None or "domain" not in self.train:
            raise ConfigError("data.train", "training columns need a 'domain' column (int64 [N])")
        domain = self.train["domain"]
        if not isinstance(domain, torch.Tensor) or domain.dtype != torch.int64 or domain.dim() != 1:
            raise ConfigError("data.train", "'domain' must be an int64 tensor of shape [N]")
        for where, columns in (
            ("data.train", self.train),
            ("data.meta", self.meta),
            ("data.test", self.test),  # used only at the end: checked now all the same
            ("data.val", self.val),
        ):
            _check_column_types(where, columns or {})
            try:
                num_rows(columns or {})
            except ValueError as err:
                raise ConfigError(where, str(err)) from None
        if domain.numel() and (int(domain.min()) < 0 or int(domain.max()) >= k):
            raise ConfigError(
                "data.train", f"'domain' indices must lie in [0, {k}) for {k} domain names"
            )
        empty = [n for n, size in zip(self.names, self.domain_sizes()) if size == 0]
        if empty:
            raise ConfigError("data", f"domain(s) {empty} have no training examples")
        if self.meta is None or num_rows(self.meta) == 0:
            raise ConfigError(
                "data.meta", "the meta set is missing or empty; the outer loss needs it"
            )
        for where, columns in (("data.train", self.train), ("data.meta", self.meta)):
            _check_finite(where, columns)
        for where, columns in (("data.test", self.test), ("data.val", self.val)):
            if columns is not None:
                _check_finite(where, columns)


def _check_column_types(field: str, columns: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a column that is not a tensor (or a dict of them): a
    batch takes rows of tensors only and hands any other value whole to every batch, so a list
    or an array of per-example values would reach the model or the loss unaligned with the
    batch's rows (a TypeError deep inside, or a silent mismatch in a loss of one's own). A
    column that requires grad is refused too: the first inner step would backpropagate into
    the graph that made it, and the second fail with "backward through the graph a second
    time"."""
    for name, value in leaves(columns):
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                field,
                f"column {name!r} is a {type(value).__name__}, not a tensor: columns "
                "hold one row per example as tensors (e.g. torch.as_tensor(values)); a "
                "batch takes rows of tensors only",
            )
        if value.requires_grad:  # every step would backpropagate into the graph that made it
            raise ConfigError(
                field,
                f"column {name!r} requires grad (it was computed by an autograd graph): "
                "columns are data, not parameters; pass it detached (e.g. x.detach())",
            )


def _check_finite(field: str, columns: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` when a floating column holds NaN or inf (one host read per
    column, before training)."""
    for name, value in leaves(columns):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ConfigError(
                    field,
                    f"column {name!r} holds {bad} non-finite value(s) (NaN/inf); "
                    "clean or drop those rows: they would make every loss on them NaN",
                )
