"""Training batches composed from per-domain streams: the sampler the trainer draws from when
the domains are corpora on disk.

Each *global* batch (all ranks together, ``batch_size`` rows) is composed as the in-memory
sampler composes it (:mod:`bilevel.data.samplers`): systematic sampling of the shares that
``trainer.sampling`` gives (``uniform``, ``temperature`` or ``size`` over the domains' sizes in
tokens, or the current ``weights``), so each domain gets ``floor`` or ``ceil`` of its share of
the rows and none with a share is starved. Every rank draws the same composition from the same
random stream and takes every ``world_size``-th slot; the rows of each slot come from that
domain's stream (:mod:`bilevel.data.corpus.streams`).

Reading never waits on the model: one background thread keeps each domain's stream a few
hundred sequences ahead (reading, tokenizing and packing), while the training loop only
composes and copies. Under ``trainer.sampling=weights`` the weights are read back to the host
once per outer update (K numbers; the in-memory sampler draws on the device and needs none).

Everything that decides which rows come next (the composition's random state and every
stream's position and random state) is the sampler's :meth:`state_dict`, saved in each
checkpoint: a resumed run reads exactly the rows it would have read.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.data.samplers import APPLIES_WEIGHTS, SAMPLING, Batch, temperature_shares

__all__ = ["StreamSampler"]


class _Reader(threading.Thread):
    """The background thread that keeps the streams ahead of the training loop."""

    def __init__(self, streams: list[Any]) -> None:
        super().__init__(name="bilevel-corpus-reader", daemon=True)
        self.streams = streams
        self.wake = threading.Condition()
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            progressed = False
            for stream in self.streams:
                while stream.fill():
                    progressed = True
                    if self.stopped:
                        return
            with self.wake:
                self.wake.notify_all()
                if not progressed and not self.stopped:
                    self.wake.wait(timeout=0.05)

    def poke(self) -> None:
        with self.wake:
            self.wake.notify_all()

    def wait_for_data(self) -> None:
        with self.wake:
            self.wake.notify_all()
            self.wake.wait(timeout=0.05)


class StreamSampler:
    """Batches from per-domain streams, with the interface of the in-memory
    :class:`~bilevel.data.samplers.DomainSampler`.

    Args:
        streams: one stream per domain (:class:`~bilevel.data.corpus.streams.BlockStream` or
            :class:`~bilevel.data.corpus.streams.WindowStream`), for this rank.
        sizes: each domain's size in tokens (for ``size`` and ``temperature``).
        batch_size: the global batch (split evenly across ranks).
        sampling: ``uniform`` | ``size`` | ``weights`` | ``temperature``.
        seed: the run's seed (the composition's random stream).
        rank: this process; world_size: how many.
        temperature: T of ``temperature``.
        device: where batches go.
        columns: ``(sequences [b, L + 1] int64 tensor) -> column dict`` (inputs and targets).
        check: ``(sequences) -> None``, run on each batch before it is copied (the token ids
            against the model's vocabulary).
    """

    def __init__(
        self,
        streams: list[Any],
        sizes: list[float],
        batch_size: int,
        sampling: str = "uniform",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
        columns: Any = None,
        check: Any = None,
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.streams = streams
        self.k = len(streams)
        self.sampling = sampling
        self.rank, self.world = rank, world_size
        self.global_batch = (batch_size // world_size) * world_size
        self.batch_size = batch_size // world_size
        self.device = torch.device(device)
        self.columns, self.check = columns, check
        self.size_list = [float(s) for s in sizes]
        self.n = int(sum(sizes))
        total = sum(self.size_list)
        self.uniform_shares = [1.0 / self.k] * self.k
        if sampling == "size":
            self.shares = [s / total for s in self.size_list]
        elif sampling == "temperature":
            self.shares = temperature_shares(self.size_list, temperature)
        else:
            self.shares = self.uniform_shares
        self.rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919])
        self.inverse_counts = None if sampling in APPLIES_WEIGHTS else self._inverse(self.shares)
        self.uniform_inverse_counts = self._inverse(self.uniform_shares)
        self._weights_of: Tensor | None = None
        self._weights: np.ndarray | None = None
        self._reader: _Reader | None = None
        self._lock = threading.Lock()

    def _inverse(self, shares: list[float]) -> Tensor:
        b = self.batch_size
        return torch.tensor(
            [1.0 / (b * s) if s > 0 else 0.0 for s in shares],
            device=self.device,
            dtype=torch.float32,
        )

    def expected_counts(self, uniform: bool = False) -> list[float]:
        shares = self.uniform_shares if uniform else self.shares
        return [self.batch_size * s for s in shares]

    # -- composing --------------------------------------------------------------------------------

    def _slots(self, shares: np.ndarray) -> np.ndarray:
        """The domain of each slot of a global batch: systematic sampling of ``shares``."""
        b = self.global_batch
        order = self.rng.random(self.k).argsort()
        bounds = np.cumsum(shares[order].astype(np.float64))
        bounds = bounds / bounds[-1]
        points = (self.rng.random() + np.arange(b)) / b
        slot = np.minimum(np.searchsorted(bounds, points, side="right"), self.k - 1)
        return order[slot]

    def _batch(self, shares: np.ndarray, inverse: Tensor | None, count: bool = True) -> Batch:
        slots = self._slots(shares)
        mine = np.arange(self.rank, self.global_batch, self.world)
        rows: list[np.ndarray | None] = [None] * len(mine)
        domains = slots[mine]
        self._start_reader()
        for k in range(self.k):
            in_domain = np.flatnonzero(slots == k)  # the global slots of domain k, in order
            if not len(in_domain):
                continue
            position = {int(s): j for j, s in enumerate(in_domain)}
            taken = [int(s) for s in mine if s in position]
            sequences = self.streams[k].take(
                len(in_domain), [position[s] for s in taken], self._wait, count, slots=taken
            )
            where = {int(s): i for i, s in enumerate(mine)}
            for slot, sequence in zip(taken, sequences, strict=True):
                rows[where[slot]] = sequence
        sequences = torch.from_numpy(np.stack(rows)).to(torch.int64)
        if self.check is not None:
            self.check(sequences)
        columns = self.columns(sequences)
        columns["domain"] = torch.from_numpy(domains.astype(np.int64))
        batch = Batch(_to_device(columns, self.device))
        batch.inverse_counts = inverse
        return batch

    def _wait(self) -> None:
        """Wait a moment for the reading thread (started on the first wait)."""
        self._start_reader()
        if self._reader is not None:
            self._reader.wait_for_data()

    def _start_reader(self) -> None:
        if self._reader is None and any(s.kind == "blocks" for s in self.streams):
            self._reader = _Reader(self.streams)
            self._reader.start()

    def _weight_shares(self, weights: Tensor) -> np.ndarray:
        if weights is not self._weights_of:  # a new outer update: one read of K numbers
            self._weights_of = weights
            self._weights = weights.detach().double().clamp_min(0).cpu().numpy()
        return self._weights

    def next(self, weights: Tensor | None = None) -> Batch:
        """The next batch (``weights`` ``[K]`` when sampling by weights)."""
        if self.sampling == "weights":
            if weights is None:
                raise ValueError("sampling='weights' needs the current domain weights")
            return self._batch(self._weight_shares(weights), None)
        return self._batch(np.asarray(self.shares), self.inverse_counts)

    def draw(self, shares: Tensor) -> Batch:
        """A batch whose domains follow ``shares`` (a method's own policy)."""
        return self._batch(shares.detach().double().cpu().numpy(), None)

    def next_uniform(self) -> Batch:
        """A batch with an equal share of every domain, for a hypergradient: read, but not
        counted in :meth:`seen` (the model is not trained on it)."""
        return self._batch(np.asarray(self.uniform_shares), self.uniform_inverse_counts, False)

    # -- what was read ----------------------------------------------------------------------------

    def seen(self) -> dict[str, list[int]]:
        """This rank's cumulative counts per domain: tokens and documents of the batches drawn
        for inner steps (not of a hypergradient's uniform batches),
        sequences, and (counted once per block, in the first epoch) bad rows skipped and
        tokens dropped at block ends."""
        return {
            "tokens": [s.tokens for s in self.streams],
            "documents": [s.documents for s in self.streams],
            "sequences": [s.sequences for s in self.streams],
            "bad_rows": [s.bad_rows for s in self.streams],
            "dropped": [s.dropped for s in self.streams],
        }

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "streams": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        if self._reader is not None:
            self._reader.poke()

    def close(self) -> None:
        """Stop the reading thread (the run is over)."""
        if self._reader is not None:
            self._reader.stopped = True
            self._reader.poke()
            self._reader.join(timeout=5)
            self._reader = None


def _to_device(columns: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in columns.items():
        if isinstance(value, dict):
            out[key] = _to_device(value, device)
        elif device.type == "cuda":
            out[key] = value.pin_memory().to(device, non_blocking=True)
        else:
            out[key] = value.to(device)
    return out
