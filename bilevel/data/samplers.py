"""Batch samplers that run on the data's device and never synchronize with the host.

:class:`DomainSampler` draws training batches that mix all K domains. ``sampling`` decides how
many rows of each domain a batch of b rows holds:

* ``"uniform"``: share 1/K per domain;
* ``"temperature"``: shares proportional to size_k^(1/T) (``T = 1``: proportional to size;
  large T: towards uniform), the data-mixing baseline;
* ``"weights"``: shares equal to the current domain weights (DoReMi's final training);
* ``"size"``: plain shuffling of the union: each epoch is a fresh permutation of all rows, cut
  into consecutive batches, so each domain appears in proportion to its size.

For the first three, each batch is drawn by *systematic sampling*: the domains are put in a fresh
random order, the unit interval is cut into their shares, and b equally spaced points with one
random offset pick the domains. Domain k then gets floor(b s_k) or ceil(b s_k) rows, exactly
b s_k in expectation, the counts always sum to b, and a domain whose share is below 1/b still
appears in a fraction b s_k of the batches: no domain with a non-zero share is ever starved.
Rows within a domain are drawn uniformly with replacement.

Per-domain losses: with ``uniform``, ``size`` and ``temperature`` the trainer divides each
domain's summed loss by its *expected* count b s_k (:attr:`DomainSampler.inverse_counts`),
which is an unbiased estimate of the domain's mean loss even when a batch happens to hold no
row of it (the plain mean would count such a domain as 0, a bias towards 0). When the sampler
applies the weights (``weights``, ``temperature``), the objective is the plain batch mean and
the per-domain means are for logging only.

Every generator lives on the device and its state (and the ``size`` permutation) is part of every
checkpoint, so a resumed run draws the same batches. Under ``torchrun`` every rank draws the
same *global* batch of ``batch_size`` rows from one random stream and keeps every
``world_size``-th row (``batch_size / world_size`` of them): the same seed gives the same global
batches at any world size, so two ranks train on exactly the rows one process would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.data.columns import Columns, num_rows, take, tensors

__all__ = ["APPLIES_WEIGHTS", "Batch", "DomainSampler", "MetaSampler", "SAMPLING"]

SAMPLING = ("uniform", "size", "weights", "temperature")
#: sampling modes in which the sampler itself applies the mixture (objective = batch mean)
APPLIES_WEIGHTS = ("weights", "temperature")


class Batch(dict):
    """A training batch (a plain ``dict`` of columns) that also carries the per-domain
    normalizer it was drawn with: ``inverse_counts`` ``[K]`` (1 / expected count, 0 for a
    domain with no share), or ``None`` to average over the rows actually present."""

    inverse_counts: Tensor | None = None


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def temperature_shares(sizes: list[int], temperature: float) -> list[float]:
    """size_k^(1/T), normalized to sum 1."""
    raw = [float(s) ** (1.0 / temperature) for s in sizes]
    total = sum(raw)
    return [r / total for r in raw]


class DomainSampler:
    """Training batches ``{..., "domain": int64 [b]}`` drawn from all K domains.

    Args:
        columns: training columns with a ``"domain"`` column, already on ``device``.
        num_domains: K.
        batch_size: global batch size (split evenly across ranks).
        sampling: ``"uniform"`` | ``"size"`` | ``"weights"`` | ``"temperature"``.
        seed: the random stream's seed.
        rank: this process's rank (each rank draws from its own stream).
        world_size: the number of ranks.
        temperature: T for ``sampling="temperature"``.
    """

    def __init__(
        self,
        columns: Columns,
        num_domains: int,
        batch_size: int,
        sampling: str = "uniform",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        temperature: float = 1.0,
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        if batch_size < world_size or batch_size < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than the world size {world_size}")
        if sampling == "temperature" and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        domain = columns["domain"]
        self.device = domain.device
        self.k = num_domains
        self.sampling = sampling
        self.batch_size = batch_size // world_size
        self.rank, self.world = rank, world_size
        self.global_batch = self.batch_size * world_size
        order = torch.argsort(domain, stable=True)
        self.columns = take(columns, order)
        self.n = int(domain.numel())
        sizes = torch.bincount(domain.cpu(), minlength=num_domains)
        self.size_list = sizes.tolist()
        self.sizes = sizes.to(self.device)
        self.starts = (torch.cumsum(sizes, 0) - sizes).to(self.device)
        self.generator = _generator(self.device, seed * 7919)  # one stream for all ranks
        self.uniform_shares = [1.0 / num_domains] * num_domains
        if sampling == "size":
            self.shares = [s / self.n for s in self.size_list]
        elif sampling == "temperature":
            self.shares = temperature_shares(self.size_list, temperature)
        else:
            self.shares = self.uniform_shares
        self._shares_t = torch.tensor(self.shares, device=self.device, dtype=torch.float64)
        self._uniform_t = torch.tensor(self.uniform_shares, device=self.device, dtype=torch.float64)
        #: 1 / expected count of each domain in a batch from :meth:`next` (``None`` when the
        #: sampler applies the weights: the objective is then the batch mean)
        self.inverse_counts = (
            None if sampling in APPLIES_WEIGHTS else self._inverse(self.shares, self.batch_size)
        )
        self.uniform_inverse_counts = self._inverse(self.uniform_shares, self.batch_size)
        self._perm: Tensor | None = None
        self._cursor = 0

    def _inverse(self, shares: list[float], b: int) -> Tensor:
        return torch.tensor([1.0 / (b * s) if s > 0 else 0.0 for s in shares], device=self.device)

    def expected_counts(self, uniform: bool = False) -> list[float]:
        """Rows of each domain per batch, in expectation (``uniform``: for :meth:`next_uniform`)."""
        shares = self.uniform_shares if uniform else self.shares
        return [self.batch_size * s for s in shares]

    # -- drawing -----------------------------------------------------------------------------------

    def systematic(self, shares: Tensor) -> Tensor:
        """Domains ``[B]`` for one global batch: systematic sampling of ``shares`` ``[K]`` (see
        the module doc), entirely on the device."""
        b = self.global_batch
        order = torch.rand(self.k, generator=self.generator, device=self.device).argsort()
        bounds = torch.cumsum(shares.to(torch.float64)[order], 0)
        bounds = bounds / bounds[-1]
        offset = torch.rand(1, generator=self.generator, device=self.device, dtype=torch.float64)
        points = (offset + torch.arange(b, device=self.device, dtype=torch.float64)) / b
        slot = torch.searchsorted(bounds, points, right=True).clamp_max(self.k - 1)
        return order[slot]

    def _rows(self, domains: Tensor) -> Columns:
        """This rank's rows of the global batch whose slots hold ``domains`` ``[B]``: a row of
        its domain for each slot, drawn for all slots alike on every rank; every
        ``world_size``-th slot is this rank's."""
        u = torch.rand(domains.shape, generator=self.generator, device=self.device)
        last = self.sizes[domains] - 1
        # u < 1, but u * size can round up to size in float32 for huge domains: clamp.
        offsets = torch.minimum((u * (last + 1).float()).long(), last)
        rows = self.starts[domains] + offsets
        if self.world > 1:
            domains, rows = domains[self.rank :: self.world], rows[self.rank :: self.world]
        batch = take(self.columns, rows)
        batch["domain"] = domains
        return batch

    def _batch(self, columns: Columns, inverse: Tensor | None) -> Batch:
        out = Batch(columns)
        out.inverse_counts = inverse
        return out

    def _shuffled(self) -> Columns:
        """This rank's rows of the next B rows of the current epoch's permutation (a new one
        when it runs out)."""
        parts, need = [], self.global_batch
        while need:
            if self._perm is None or self._cursor >= self.n:
                self._perm = torch.randperm(self.n, generator=self.generator, device=self.device)
                self._cursor = 0
            take_n = min(need, self.n - self._cursor)
            parts.append(self._perm[self._cursor : self._cursor + take_n])
            self._cursor += take_n
            need -= take_n
        index = parts[0] if len(parts) == 1 else torch.cat(parts)
        return take(self.columns, index[self.rank :: self.world] if self.world > 1 else index)

    def next(self, weights: Tensor | None = None) -> Batch:
        """The next batch; ``weights`` ``[K]`` (non-negative) is used when sampling by weights."""
        if self.sampling == "size":
            return self._batch(self._shuffled(), self.inverse_counts)
        if self.sampling == "weights":
            if weights is None:
                raise ValueError("sampling='weights' needs the current domain weights")
            shares = weights.detach().to(torch.float64).clamp_min(0)
            return self._batch(self._rows(self.systematic(shares)), None)
        return self._batch(self._rows(self.systematic(self._shares_t)), self.inverse_counts)

    def draw(self, shares: Tensor) -> Batch:
        """A batch whose domains follow ``shares`` ``[K]`` (a method's own policy, e.g. a
        bandit's), averaged over the rows present (``inverse_counts=None``)."""
        return self._batch(self._rows(self.systematic(shares.detach())), None)

    def next_uniform(self) -> Batch:
        """A batch with an equal share of every domain (for hypergradients)."""
        return self._batch(
            self._rows(self.systematic(self._uniform_t)), self.uniform_inverse_counts
        )

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {"generator": self.generator.get_state()}
        if self._perm is not None:
            state["perm"] = self._perm.cpu()
            state["cursor"] = self._cursor
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.generator.set_state(state["generator"])
        if "perm" in state:
            self._perm = state["perm"].to(self.device)
            self._cursor = int(state["cursor"])


class MetaSampler:
    """Meta batches: the whole meta set (``batch_size=None``) or random rows with replacement."""

    def __init__(
        self,
        columns: Columns,
        batch_size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.columns = columns
        self.n = num_rows(columns)
        self.device = next(tensors(columns)).device
        self.batch_size = None if batch_size is None else max(1, batch_size // world_size)
        self.rank, self.world = rank, world_size
        self.generator = _generator(self.device, seed * 7919 + 104729)  # one for all ranks
        if self.batch_size is None and world_size > 1:
            # Each rank takes its own slice of the meta set.
            index = torch.arange(rank, self.n, world_size, device=self.device)
            self.columns = take(columns, index)

    def next(self) -> Columns:
        if self.batch_size is None:
            return self.columns
        index = torch.randint(
            0, self.n, (self.batch_size * self.world,), generator=self.generator, device=self.device
        )
        return take(self.columns, index[self.rank :: self.world] if self.world > 1 else index)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
