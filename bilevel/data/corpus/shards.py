"""Pre-tokenized token shards, memory-mapped: the nanoGPT ``.bin`` layout (a flat array of
``uint16`` or ``uint32`` token ids, no header) and ``.npy`` files (numpy's header says the
dtype). Nothing is read until a window is: opening a shard costs its size on disk.

Bad input is one line naming the shard: a glob that matches nothing, an empty shard, a ``.bin``
whose size is not a multiple of its dtype, a ``.npy`` that is not one flat integer array, and
(checked on every window read, and on the first window of each shard at start) a token id the
model has no embedding for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bilevel.data.corpus.files import expand_globs
from bilevel.errors import ConfigError

__all__ = ["DTYPES", "TokenShards"]

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenShards:
    """The token shards of one domain (or of the meta or test set).

    Args:
        field: the config key that named them (for messages).
        patterns: a glob or a list of globs.
        dtype: ``uint16`` or ``uint32`` (``.bin`` shards; a ``.npy`` says its own).
        max_tokens: use only the first ``max_tokens`` tokens (over the shards in order).
    """

    def __init__(
        self, field: str, patterns: Any, dtype: str = "uint16", max_tokens: int | None = None
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError("data.dtype", f"must be uint16 or uint32, got {dtype!r}")
        self.field = field
        self.files = expand_globs(field, patterns)
        self.arrays: list[np.ndarray] = []
        for path in self.files:
            self.arrays.append(_open(path, field, DTYPES[dtype]))
        self.lengths = [len(a) for a in self.arrays]
        if max_tokens is not None:
            left, lengths = int(max_tokens), []
            for n in self.lengths:
                lengths.append(min(n, left))
                left -= lengths[-1]
            keep = [i for i, n in enumerate(lengths) if n > 0]
            self.arrays = [self.arrays[i][: lengths[i]] for i in keep]
            self.files = [self.files[i] for i in keep]
            self.lengths = [lengths[i] for i in keep]
        self.vocab_limit: int | None = None

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def window(self, shard: int, offset: int, length: int) -> np.ndarray:
        """``length`` tokens of ``shard`` from ``offset`` (int64), checked against the model's
        vocabulary when one is set (:attr:`vocab_limit`)."""
        ids = np.asarray(self.arrays[shard][offset : offset + length], dtype=np.int64)
        if self.vocab_limit is not None and len(ids) and int(ids.max()) >= self.vocab_limit:
            raise ConfigError(
                self.field,
                f"{self.files[shard]} holds token id {int(ids.max())} (near token {offset}) but "
                f"the model's vocabulary has {self.vocab_limit} ids: shards tokenized for "
                "another model, or the wrong data.dtype / data.vocab_size",
            )
        return ids

    def check_vocabulary(self, limit: int) -> None:
        """Set the model's vocabulary size and check the first window of every shard."""
        self.vocab_limit = int(limit)
        for i, n in enumerate(self.lengths):
            self.window(i, 0, min(n, 4096))

    def evenly_spaced(self, count: int, length: int) -> np.ndarray:
        """``count`` windows spread evenly over the shards (a meta or test set) ``[n, length]``;
        fewer where the shards hold fewer."""
        starts = []
        for i, n in enumerate(self.lengths):
            starts += [(i, o) for o in range(0, n - length + 1, length)]
        if not starts:
            raise ConfigError(self.field, f"holds no window of {length} tokens (data.seq_len + 1)")
        picks = np.linspace(0, len(starts) - 1, num=min(count, len(starts))).round().astype(int)
        return np.stack([self.window(*starts[p], length) for p in picks])


def _open(path: Path, field: str, dtype: Any) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(field, f"{path} is empty")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise ConfigError(field, f"{path} is not a readable .npy file ({err})") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(
                field,
                f"{path} holds a {array.dtype} array of shape {array.shape}: a token shard is "
                "one flat array of integer ids",
            )
        return array
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise ConfigError(
            field,
            f"{path} has {size} bytes, not a multiple of {itemsize} ({np.dtype(dtype).name}): "
            "not a token shard of this dtype (data.dtype=uint16|uint32)",
        )
    return np.memmap(path, dtype=dtype, mode="r")
