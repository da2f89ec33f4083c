"""``CorpusData``: K domains that stay on disk (made by :mod:`bilevel.data.corpus.builders`).

A ``CorpusData`` is a :class:`~bilevel.data.DomainData` whose training rows are not in memory:
its ``train`` columns hold only a preview (the first few sequences of each domain, for the
checks made before training), and the trainer draws its batches from
:meth:`CorpusData.train_sampler`, which reads each domain lazily. The meta and test sets are
small and read into memory (``meta_size``, ``test_size`` and ``val_size`` sequences; ``val`` is
an optional validation split, distinct from the meta set, for a sweep to tune on).

Sizes: a domain's size in tokens (what ``trainer.sampling=size`` and ``temperature`` share
by) is exact for token shards and for capped domains (``max_tokens``, ``max_documents``); for
files and datasets it is estimated from the tokens per byte (or row) of the domain's first
documents, so that nothing is read whole at start. ``summary.json`` records the sizes and
whether they are estimates (``info.tokens``, ``info.sizes_estimated``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from bilevel.data.columns import Columns
from bilevel.data.corpus.sampler import StreamSampler
from bilevel.data.corpus.streams import check_lanes
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import lm_metrics
from bilevel.errors import ConfigError

__all__ = ["CorpusData", "Domain", "assemble", "sequence_columns"]

PREVIEW = 4  # sequences of each domain held in memory for the checks before training


@dataclass
class Domain:
    """How to make one domain's stream on a rank."""

    make: Callable[[int, int, int, int, str, int], Any]  # (index, seed, rank, world, reads, ahead)
    tokens: float
    estimated: bool


@dataclass
class CorpusData(DomainData):
    """Domains read from disk (see the module doc). Built by :func:`files`, :func:`tokens` or
    :func:`hf`; the trainer uses it as it uses a ``DomainData``."""

    domains: dict[str, Domain] = field(default_factory=dict)
    seq_len: int = 0
    rank_reads: str = "own_blocks"
    #: with ``rank_reads="lanes"``: how many lanes each domain is read as
    lanes: int = 8
    hf_inputs: bool = False
    vocab_limit: int | None = None
    checks: list[Any] = field(default_factory=list)

    def domain_sizes(self) -> list[int]:
        return [max(1, round(self.domains[n].tokens)) for n in self.names]

    def subset(self, names: list[str]) -> CorpusData:
        names = [str(n) for n in names]
        unknown = [n for n in names if n not in self.names]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                "domains", f"must list distinct domains of the data {self.names}, got {names}"
            )
        keep = [self.names.index(n) for n in names]
        domain = self.train["domain"]
        rows = torch.cat([torch.nonzero(domain == i).flatten() for i in keep])
        remap = torch.full((len(self.names),), -1, dtype=torch.int64)
        remap[keep] = torch.arange(len(keep))
        train = _take(self.train, rows)
        train["domain"] = remap[train["domain"]]
        info = {
            k: {n: v[n] for n in names if n in v} if isinstance(v, dict) else v
            for k, v in self.info.items()
        }
        return replace(
            self, names=names, train=train, info=info, domains={n: self.domains[n] for n in names}
        )

    def set_vocabulary(self, size: int) -> None:
        """The model's vocabulary: every batch's token ids are checked against it."""
        self.vocab_limit = int(size)
        for check in self.checks:
            check(self.vocab_limit)

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
    ) -> StreamSampler:
        ahead = max(256, 2 * batch_size)
        reads = self.rank_reads
        if reads == "lanes":  # checked here too: a domain with few blocks reads as all
            check_lanes(self.lanes, world_size)
            reads = f"lanes:{self.lanes}"
            ahead = max(32, ahead // self.lanes)  # each lane keeps its own sequences ahead
        streams = [
            self.domains[name].make(i, seed, rank, world_size, reads, ahead)
            for i, name in enumerate(self.names)
        ]
        return StreamSampler(
            streams,
            [self.domains[n].tokens for n in self.names],
            batch_size,
            sampling,
            seed,
            rank,
            world_size,
            temperature,
            device,
            columns=self._columns,
            check=self._check_ids,
        )

    def _columns(self, sequences: torch.Tensor) -> Columns:
        return sequence_columns(sequences, self.hf_inputs)

    def _check_ids(self, sequences: torch.Tensor) -> None:
        if self.vocab_limit is not None and sequences.numel():
            top = int(sequences.max())
            if top >= self.vocab_limit:
                raise ConfigError(
                    "data",
                    f"a batch holds token id {top} but the model's vocabulary has "
                    f"{self.vocab_limit} ids: the corpus was tokenized for another model "
                    "(data.tokenizer)",
                )


def sequence_columns(sequences: torch.Tensor, hf_inputs: bool = False) -> Columns:
    """Inputs and next-token targets of sequences ``[n, seq_len + 1]``: ``x`` the first
    ``seq_len`` tokens (or ``{input_ids, attention_mask}`` for Hugging Face models), ``y`` the
    last ``seq_len``."""
    x, y = sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()
    if hf_inputs:
        return {"x": {"input_ids": x, "attention_mask": torch.ones_like(x)}, "y": y}
    return {"x": x, "y": y}


def _take(columns: Columns, rows: torch.Tensor) -> Columns:
    out: Columns = {}
    for key, value in columns.items():
        out[key] = _take(value, rows) if isinstance(value, dict) else value.index_select(0, rows)
    return out


def assemble(
    names: list[str],
    previews: list[np.ndarray],
    domains: dict[str, Domain],
    meta: Columns,
    test: Columns | None,
    seq_len: int,
    vocab_size: int,
    rank_reads: str,
    hf_inputs: bool,
    info: dict[str, Any],
    checks: list[Any] | None = None,
    val: Columns | None = None,
    lanes: int = 8,
) -> CorpusData:
    sequences = torch.from_numpy(np.concatenate(previews).astype(np.int64))
    train = sequence_columns(sequences, hf_inputs)
    train["domain"] = torch.cat(
        [torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(previews)]
    )
    info = {
        **info,
        "tokens": {n: int(domains[n].tokens) for n in names},
        "sizes_estimated": any(domains[n].estimated for n in names),
    }
    return CorpusData(
        names=names,
        train=train,
        meta=meta,
        test=test,
        val=val,
        evaluate=lm_metrics if test is not None or val is not None else None,
        model_kwargs={"vocab_size": vocab_size, "max_len": seq_len},
        info=info,
        domains=domains,
        seq_len=seq_len,
        rank_reads=rank_reads,
        lanes=lanes,
        hf_inputs=hf_inputs,
        checks=checks or [],
    )
