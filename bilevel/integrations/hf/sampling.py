"""``sampling="weights"`` inside Hugging Face ``Trainer``: a sampler whose batches hold each
domain in proportion to the current domain weights.

Each batch of ``batch_size`` slots is composed by systematic sampling of the weights (the
domains in a fresh random order, evenly spaced points with one random offset: a domain gets the
floor or the ceiling of its share of the slots, and none with a share is starved), and each slot
takes an example of its domain at random. The random numbers a batch consumes do not depend on
the weights (``K + 1 + batch_size`` of them), and the stream is seeded by the epoch, so the
trainer's resume (which replays the epoch's sampler up to the step it resumes at) draws exactly
the batches a run left alone would have drawn from there on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["WeightedDomainSampler"]


class WeightedDomainSampler(Sampler[int]):
    """Indices of a dataset's examples, batch by batch, by the domain weights.

    Args:
        domains: the domain index of every example of the dataset.
        num_domains: K.
        batch_size: examples per batch (the trainer's per-device batch size: under DDP each
            rank takes every ``world_size``-th batch).
        seed: the stream's seed (with the epoch).
    """

    def __init__(
        self, domains: Sequence[int], num_domains: int, batch_size: int, seed: int = 0
    ) -> None:
        domains = np.asarray(domains, dtype=np.int64)
        self.by_domain = [np.flatnonzero(domains == k) for k in range(num_domains)]
        empty = [k for k, rows in enumerate(self.by_domain) if len(rows) == 0]
        if empty:
            raise ValueError(f"domain(s) {empty} have no example in the train dataset")
        self.k, self.batch_size, self.seed = num_domains, batch_size, seed
        self.num_samples = len(domains)
        self.shares = np.full(num_domains, 1.0 / num_domains)
        self.epoch = 0

    def set_shares(self, weights: torch.Tensor | Sequence[float]) -> None:
        """The shares the next batches follow (the weights, read once per outer update)."""
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().double().cpu().numpy()
        shares = np.asarray(weights, dtype=np.float64).clip(min=0)
        self.shares = shares / shares.sum() if shares.sum() > 0 else np.full(self.k, 1 / self.k)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, self.epoch])
        b = self.batch_size
        left = self.num_samples
        while left > 0:
            order = rng.random(self.k).argsort()
            bounds = np.cumsum(self.shares[order])
            bounds = bounds / bounds[-1]
            points = (rng.random() + np.arange(b)) / b
            slots = order[np.minimum(np.searchsorted(bounds, points, side="right"), self.k - 1)]
            picks = rng.random(b)
            for slot, u in zip(slots[: min(b, left)], picks, strict=False):
                rows = self.by_domain[slot]
                yield int(rows[min(int(u * len(rows)), len(rows) - 1)])
            left -= b
