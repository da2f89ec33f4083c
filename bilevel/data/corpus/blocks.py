"""Reading a source's blocks: the chunks of documents a block holds, and a domain's size in
tokens estimated from its first block (nothing is read whole at start). The builders use
both for the training domains and the held-out sets; it imports nothing of the corpus
package."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["estimate_tokens", "source_chunks"]


def source_chunks(source: Any, block: Any) -> Iterator[tuple[list[str], int]]:
    """The ``(documents, bad rows)`` chunks of a block: one for a file block, read in one go,
    several for a streamed shard."""
    result = source.read(block)
    if isinstance(result, tuple):  # a file block: read in one go
        yield result
    else:
        yield from result


def estimate_tokens(source: Any, blocks: list[Any], read: Callable, per_unit: str) -> float:
    """The domain's tokens from the first block's tokens per byte (or per row)."""
    first = blocks[0]
    sample_tokens = 0
    for documents, _ in itertools.islice(read(first), 1):
        sample_tokens += sum(len(d) + 1 for d in documents)
    units = sum(b.size for b in blocks)
    if per_unit == "shard":  # a streamed dataset: shards of unknown size
        return float(sample_tokens * len(blocks))
    return float(sample_tokens) / max(1, first.size) * units
