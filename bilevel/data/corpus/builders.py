"""The builders of the ``data=files``, ``data=tokens`` and ``data=hf`` config groups: each
checks its settings, opens every domain's source (reading only its first documents, for a
preview and a size estimate), reads the meta and test sets, and returns a
:class:`~bilevel.data.corpus.corpus_data.CorpusData`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from bilevel.data.checks import check_seed
from bilevel.data.columns import Columns
from bilevel.data.corpus.blocks import estimate_tokens, source_chunks
from bilevel.data.corpus.corpus_data import PREVIEW, CorpusData, Domain, assemble, sequence_columns
from bilevel.data.corpus.files import Block, FileSource
from bilevel.data.corpus.hf import HFSource
from bilevel.data.corpus.packing import pack
from bilevel.data.corpus.shards import TokenShards
from bilevel.data.corpus.streams import WindowStream, block_stream, check_lanes
from bilevel.data.corpus.tokenizers import Tokenizer, load_tokenizer
from bilevel.errors import ConfigError, is_bool, is_integer

__all__ = ["files", "hf", "tokens"]

RANK_READS = ("own_blocks", "all", "lanes")


# -- shared checks ------------------------------------------------------------------------------


def _check(
    seq_len: Any,
    meta_size: Any,
    test_size: Any,
    max_tokens: Any,
    max_documents: Any,
    rank_reads: Any,
    skip_bad_rows: Any,
    hf_inputs: Any,
    val_size: Any = 1,
) -> None:
    for key, value, low in (
        ("seq_len", seq_len, 1),
        ("meta_size", meta_size, 1),
        ("test_size", test_size, 1),
        ("val_size", val_size, 1),
    ):
        if not is_integer(value) or value < low:
            raise ConfigError(f"data.{key}", f"must be an integer >= {low}, got {value!r}")
    for key, value in (("max_tokens", max_tokens), ("max_documents", max_documents)):
        if value is not None and not (is_integer(value) and value >= 1):
            raise ConfigError(f"data.{key}", f"must be an integer >= 1 or null, got {value!r}")
    if rank_reads not in RANK_READS:
        raise ConfigError(
            "data.rank_reads", f"must be own_blocks, all or lanes, got {rank_reads!r}"
        )
    for key, value in (("skip_bad_rows", skip_bad_rows), ("hf_inputs", hf_inputs)):
        if not is_bool(value):
            raise ConfigError(f"data.{key}", f"must be true or false, got {value!r}")


def _domain_specs(domains: Any) -> dict[str, Any]:
    if not isinstance(domains, Mapping) or not domains:
        raise ConfigError(
            "data.domains",
            "must map each domain's name to its data, e.g. "
            "data.domains={news:'corp/news/*.jsonl',code:'corp/code/*.parquet'}",
        )
    return {str(k): v for k, v in domains.items()}


def _capped_blocks(
    blocks: list[Block],
    read: Callable[[Block], Iterator[tuple[list[np.ndarray], int]]],
    max_tokens: int | None,
    max_documents: int | None,
) -> tuple[list[Block], Callable, int, int]:
    """The first blocks of a domain up to ``max_tokens`` tokens or ``max_documents``
    documents (the last block cut), with a reader that keeps to the cut; and the exact tokens
    and documents kept."""
    if max_tokens is None and max_documents is None:
        return blocks, read, 0, 0
    kept_tokens = kept_docs = 0
    limits: dict[int, int] = {}
    used = 0
    for i, block in enumerate(blocks):
        used = i + 1
        count = 0
        for documents, _ in read(block):
            for doc in documents:
                if (max_documents is not None and kept_docs >= max_documents) or (
                    max_tokens is not None and kept_tokens >= max_tokens
                ):
                    break
                kept_docs += 1
                kept_tokens += len(doc) + 1
                count += 1
        limits[i] = count
        if (max_documents is not None and kept_docs >= max_documents) or (
            max_tokens is not None and kept_tokens >= max_tokens
        ):
            break
    blocks = blocks[:used]
    index = {id(b): i for i, b in enumerate(blocks)}

    def capped(block: Block) -> Iterator[tuple[list[np.ndarray], int]]:
        left = limits[index[id(block)]]
        for documents, bad in read(block):
            yield documents[:left], bad
            left -= min(left, len(documents))
            if left <= 0:
                return

    return blocks, capped, kept_tokens, kept_docs


def _sequences_from(
    blocks: list[Block],
    read: Callable[[Block], Iterator[tuple[list[np.ndarray], int]]],
    eod: int,
    length: int,
    count: int,
) -> np.ndarray:
    """The first ``count`` sequences of ``blocks`` in order (a meta or test set, a preview)."""
    found: list[np.ndarray] = []
    for block in blocks:
        for documents, _ in read(block):
            packed = pack(documents, eod, length)
            found += list(packed.sequences[: count - len(found)])
            if len(found) >= count:
                return np.stack(found)
    return np.stack(found) if found else np.zeros((0, length), np.int64)


def _block_domain(
    name: str,
    source: Any,
    tokenizer: Tokenizer,
    length: int,
    max_tokens: int | None,
    max_documents: int | None,
    per_unit: str,
) -> tuple[Domain, np.ndarray, dict[str, Any]]:
    """A domain read in blocks: its stream maker, a preview of its first sequences, and what
    the summary records of it."""

    def read(block: Block) -> Iterator[tuple[list[np.ndarray], int]]:
        for documents, bad in source_chunks(source, block):
            yield tokenizer.encode(documents), bad

    blocks, read, exact_tokens, exact_docs = _capped_blocks(
        source.blocks, read, max_tokens, max_documents
    )
    preview = _sequences_from(blocks[:2], read, tokenizer.eod_id, length, PREVIEW)
    if len(preview) == 0:
        raise ConfigError(
            f"data.domains.{name}",
            f"its first documents hold no sequence of {length} tokens (data.seq_len + 1): "
            "lower data.seq_len",
        )
    if exact_tokens:
        tokens, estimated = float(exact_tokens), False
    else:
        tokens, estimated = estimate_tokens(source, blocks, read, per_unit), True

    def make(index: int, seed: int, rank: int, world: int, reads: str, ahead: int) -> Any:
        return block_stream(
            name, index, blocks, read, tokenizer.eod_id, length, seed, rank, world, reads, ahead
        )

    info = {"tokens": int(tokens), "blocks": len(blocks)}
    if exact_docs:
        info["documents"] = exact_docs
    return Domain(make, tokens, estimated), preview, info


def _held_out(
    field: str,
    source: Any,
    tokenizer: Tokenizer,
    length: int,
    count: int,
    hf_inputs: bool,
) -> Columns:
    def read(block: Block) -> Iterator[tuple[list[np.ndarray], int]]:
        for documents, bad in source_chunks(source, block):
            yield tokenizer.encode(documents), bad

    sequences = _sequences_from(source.blocks, read, tokenizer.eod_id, length, count)
    if len(sequences) == 0:
        raise ConfigError(
            field, f"holds no sequence of {length} tokens (data.seq_len + 1): lower data.seq_len"
        )
    return sequence_columns(torch.from_numpy(sequences.astype(np.int64)), hf_inputs)


# -- the three builders -------------------------------------------------------------------------


def files(
    domains: Mapping[str, Any],
    meta: Any,
    test: Any = None,
    val: Any = None,
    val_size: int = 256,
    text_field: str = "text",
    tokenizer: str = "bytes",
    seq_len: int = 128,
    meta_size: int = 256,
    test_size: int = 256,
    max_tokens: int | None = None,
    max_documents: int | None = None,
    text_document: str = "line",
    block_bytes: int = 1 << 20,
    skip_bad_rows: bool = False,
    rank_reads: str = "own_blocks",
    hf_inputs: bool = False,
    seed: int = 0,
    lanes: int = 8,
) -> CorpusData:
    """Domains of text files: ``domains`` maps each name to a glob (or a list of globs) of
    jsonl, json, parquet or plain-text files; ``meta``, ``test`` and ``val`` (a validation split
    for sweeps: ``optimized_metric=val.loss``) are globs too.

    Documents are tokenized on the fly by ``tokenizer`` (``bytes``, or a Hugging Face
    tokenizer available offline) and packed into sequences of ``seq_len + 1`` tokens with an
    end-of-document token between documents. ``max_tokens`` / ``max_documents`` keep each
    domain's first tokens or documents (quick runs). See :mod:`bilevel.data.corpus`.
    """
    _check(
        seq_len,
        meta_size,
        test_size,
        max_tokens,
        max_documents,
        rank_reads,
        skip_bad_rows,
        hf_inputs,
        val_size,
    )
    check_seed(seed)
    check_lanes(lanes)
    if text_document not in ("line", "file"):
        raise ConfigError("data.text_document", f"must be line or file, got {text_document!r}")
    if not (is_integer(block_bytes) and block_bytes >= 1024):
        raise ConfigError("data.block_bytes", f"must be an integer >= 1024, got {block_bytes!r}")
    specs = _domain_specs(domains)
    if meta is None:
        raise ConfigError("data.meta", "the meta set is needed: a glob of its files")
    tok = load_tokenizer(tokenizer)
    length = seq_len + 1

    def source(key: str, patterns: Any) -> FileSource:
        return FileSource(key, patterns, text_field, text_document, block_bytes, skip_bad_rows)

    names, previews, built, per_domain = [], [], {}, {}
    for name, patterns in specs.items():
        domain, preview, record = _block_domain(
            name,
            source(f"data.domains.{name}", patterns),
            tok,
            length,
            max_tokens,
            max_documents,
            "bytes",
        )
        names.append(name)
        previews.append(preview)
        built[name] = domain
        per_domain[name] = record
    meta_columns = _held_out(
        "data.meta", source("data.meta", meta), tok, length, meta_size, hf_inputs
    )
    test_columns, val_columns = (
        _held_out(key, source(key, spec), tok, length, size, hf_inputs)
        if spec is not None
        else None
        for key, spec, size in (("data.test", test, test_size), ("data.val", val, val_size))
    )
    info = {"source": "files", "tokenizer": tok.name, "blocks": _pick(per_domain, "blocks")}
    return assemble(
        names,
        previews,
        built,
        meta_columns,
        test_columns,
        seq_len,
        tok.vocab_size,
        rank_reads,
        hf_inputs,
        info,
        val=val_columns,
        lanes=lanes,
    )


def hf(
    domains: Mapping[str, Any],
    meta: Any,
    test: Any = None,
    val: Any = None,
    split: str = "train",
    meta_split: str | None = None,
    test_split: str | None = None,
    val_split: str | None = None,
    text_field: str = "text",
    tokenizer: str = "bytes",
    streaming: bool = False,
    seq_len: int = 128,
    meta_size: int = 256,
    test_size: int = 256,
    val_size: int = 256,
    max_tokens: int | None = None,
    max_documents: int | None = None,
    block_rows: int = 2048,
    skip_bad_rows: bool = False,
    rank_reads: str = "own_blocks",
    hf_inputs: bool = False,
    seed: int = 0,
    lanes: int = 8,
) -> CorpusData:
    """Domains held in Hugging Face datasets: ``domains`` maps each name to a folder written
    by ``save_to_disk``, a ``load_dataset`` name available offline, or a mapping of
    ``load_dataset`` arguments; ``streaming=true`` reads them as ``IterableDataset`` shards.
    ``meta``, ``test`` and ``val`` (a validation split for sweeps) are the same kinds of spec
    (their own splits: ``meta_split``, ``test_split``, ``val_split``, default ``split``)."""
    _check(
        seq_len,
        meta_size,
        test_size,
        max_tokens,
        max_documents,
        rank_reads,
        skip_bad_rows,
        hf_inputs,
        val_size,
    )
    check_seed(seed)
    check_lanes(lanes)
    if not is_bool(streaming):
        raise ConfigError("data.streaming", f"must be true or false, got {streaming!r}")
    if not (is_integer(block_rows) and block_rows >= 1):
        raise ConfigError("data.block_rows", f"must be an integer >= 1, got {block_rows!r}")
    specs = _domain_specs(domains)
    if meta is None:
        raise ConfigError("data.meta", "the meta set is needed: a dataset spec")
    tok = load_tokenizer(tokenizer)
    length = seq_len + 1

    def source(key: str, spec: Any, which: str, stream: bool) -> HFSource:
        return HFSource(key, spec, which, text_field, stream, block_rows, skip_bad_rows)

    names, previews, built, per_domain = [], [], {}, {}
    for name, spec in specs.items():
        src = source(f"data.domains.{name}", spec, split, streaming)
        domain, preview, record = _block_domain(
            name,
            src,
            tok,
            length,
            max_tokens,
            max_documents,
            "shard" if src.streaming else "rows",
        )
        names.append(name)
        previews.append(preview)
        built[name] = domain
        per_domain[name] = record
    meta_columns = _held_out(
        "data.meta",
        source("data.meta", meta, meta_split or split, False),
        tok,
        length,
        meta_size,
        hf_inputs,
    )
    test_columns, val_columns = (
        _held_out(key, source(key, spec, which or split, False), tok, length, size, hf_inputs)
        if spec is not None
        else None
        for key, spec, which, size in (
            ("data.test", test, test_split, test_size),
            ("data.val", val, val_split, val_size),
        )
    )
    info = {"source": "hf", "tokenizer": tok.name, "streaming": bool(streaming)}
    return assemble(
        names,
        previews,
        built,
        meta_columns,
        test_columns,
        seq_len,
        tok.vocab_size,
        rank_reads,
        hf_inputs,
        info,
        val=val_columns,
        lanes=lanes,
    )


def tokens(
    domains: Mapping[str, Any],
    meta: Any,
    test: Any = None,
    val: Any = None,
    dtype: str = "uint16",
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    seq_len: int = 128,
    meta_size: int = 256,
    test_size: int = 256,
    val_size: int = 256,
    max_tokens: int | None = None,
    hf_inputs: bool = False,
    seed: int = 0,
) -> CorpusData:
    """Domains of pre-tokenized token shards (nanoGPT's ``.bin``: flat ``uint16`` or
    ``uint32`` arrays; or ``.npy``), memory-mapped; each training row is a window of
    ``seq_len + 1`` tokens at a random offset. ``vocab_size`` (or the ``tokenizer`` the shards
    were made with) sizes the model's embedding; every window is checked against the model's
    vocabulary."""
    _check(
        seq_len, meta_size, test_size, max_tokens, None, "own_blocks", False, hf_inputs, val_size
    )
    check_seed(seed)
    specs = _domain_specs(domains)
    if meta is None:
        raise ConfigError("data.meta", "the meta set is needed: a glob of its shards")
    if vocab_size is None:
        if tokenizer is None:
            raise ConfigError(
                "data.vocab_size",
                "token shards do not say their vocabulary: set data.vocab_size (e.g. 50257 for "
                "GPT-2's) or data.tokenizer (the tokenizer that made them)",
            )
        vocab_size = load_tokenizer(tokenizer).vocab_size
    if not (is_integer(vocab_size) and vocab_size >= 2):
        raise ConfigError("data.vocab_size", f"must be an integer >= 2, got {vocab_size!r}")
    length = seq_len + 1
    names, previews, built, checks = [], [], {}, []
    for name, patterns in specs.items():
        shards = TokenShards(f"data.domains.{name}", patterns, dtype, max_tokens)
        previews.append(shards.evenly_spaced(PREVIEW, length))

        def make(index, seed, rank, world, reads, ahead, shards=shards, name=name):  # noqa: ANN001
            return WindowStream(name, index, shards, length, seed)

        names.append(name)
        built[name] = Domain(make, float(shards.tokens), False)
        checks.append(shards.check_vocabulary)
    held = []
    for key, patterns, count in (
        ("data.meta", meta, meta_size),
        ("data.test", test, test_size),
        ("data.val", val, val_size),
    ):
        if patterns is None:
            held.append(None)
            continue
        shards = TokenShards(key, patterns, dtype)
        checks.append(shards.check_vocabulary)
        windows = torch.from_numpy(shards.evenly_spaced(count, length).astype(np.int64))
        held.append(sequence_columns(windows, hf_inputs))
    info = {"source": "tokens", "dtype": dtype}
    return assemble(
        names,
        previews,
        built,
        held[0],
        held[1],
        seq_len,
        int(vocab_size),
        "own_blocks",
        hf_inputs,
        info,
        checks,
        val=held[2],
    )


def _pick(per_domain: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return {name: record[key] for name, record in per_domain.items() if key in record}
