"""Documents to training sequences: token ids of each document, an end-of-document token after
each, all concatenated and cut into sequences of ``seq_len + 1`` tokens (a sequence's first
``seq_len`` tokens are the model's input, its last ``seq_len`` the next-token targets).

A block is packed on its own: its sequences do not depend on what was read before it, so the
sequences of an epoch are the same whichever process reads the block. What is left at the end
of a block (fewer than ``seq_len + 1`` tokens) is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Packed", "pack"]


@dataclass
class Packed:
    """A block's sequences ``[n, seq_len + 1]`` (int64), how many documents start in each
    ``[n]``, and how many tokens of the block were dropped at its end."""

    sequences: np.ndarray
    document_starts: np.ndarray
    dropped: int

    def __len__(self) -> int:
        return len(self.sequences)


def pack(documents: list[np.ndarray], eod_id: int, length: int) -> Packed:
    """Pack ``documents`` (token ids each) into sequences of ``length`` tokens."""
    if not documents:
        return Packed(np.zeros((0, length), np.int64), np.zeros(0, np.int64), 0)
    eod = np.array([eod_id], dtype=np.int64)
    parts = []
    for doc in documents:
        parts.append(doc)
        parts.append(eod)
    stream = np.concatenate(parts)
    n = len(stream) // length
    # where each document starts in the stream, and so in which sequence
    lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    in_sequence = starts // length
    counts = np.bincount(in_sequence[in_sequence < n], minlength=n).astype(np.int64)
    return Packed(stream[: n * length].reshape(n, length), counts, int(len(stream) - n * length))
