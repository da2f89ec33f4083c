"""Batch samplers that run on the data's device and never synchronize with the host.

:class:`DomainSampler` draws training batches that mix all K domains. The number of examples of
each domain in a batch follows ``sampling``:

* ``"uniform"``: an equal share per domain (the remainder goes to the first domains);
* ``"size"``: shares proportional to the domain sizes (plain shuffling of the union);
* ``"weights"``: drawn from the current domain weights (DoReMi's final training); the trainer then
  averages the batch loss unweighted, since the sampling already applies the weights.

Within a domain, examples are drawn uniformly with replacement by a ``torch.Generator`` on the
device, whose state is part of every checkpoint, so a resumed run draws the same batches.
Under ``torchrun`` each rank draws ``batch_size / world_size`` examples from its own stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.data.columns import Columns, num_rows, take, tensors

__all__ = ["DomainSampler", "MetaSampler", "SAMPLING"]

SAMPLING = ("uniform", "size", "weights")


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    raw = [s * total for s in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class DomainSampler:
    """Training batches ``{..., "domain": int64 [B]}`` drawn from all K domains.

    Args:
        columns: training columns with a ``"domain"`` column, already on ``device``.
        num_domains: K.
        batch_size: global batch size (split evenly across ranks).
        sampling: ``"uniform"`` | ``"size"`` | ``"weights"``.
        seed, rank, world_size: the random stream (one per rank).
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
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        if batch_size < world_size or batch_size < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than the world size {world_size}")
        domain = columns["domain"]
        self.device = domain.device
        self.k = num_domains
        self.sampling = sampling
        self.batch_size = batch_size // world_size
        order = torch.argsort(domain, stable=True)
        self.columns = take(columns, order)
        sizes = torch.bincount(domain.cpu(), minlength=num_domains)
        self.sizes = sizes.to(self.device)
        self.starts = (torch.cumsum(sizes, 0) - sizes).to(self.device)
        self.generator = _generator(self.device, seed * 7919 + rank)
        shares = [1.0 / num_domains] * num_domains
        if sampling == "size":
            shares = (sizes / sizes.sum()).tolist()
        counts = _largest_remainder(shares, self.batch_size)
        self.fixed = self._layout(counts)
        uniform = _largest_remainder([1.0 / num_domains] * num_domains, self.batch_size)
        self.uniform = self._layout(uniform)
        #: 1/count of each domain in a batch from :meth:`next` (``None`` when sampling by
        #: weights, where the counts vary); lets the trainer skip counting every step.
        self.inverse_counts = None if sampling == "weights" else self.fixed[-1]
        self.uniform_inverse_counts = self.uniform[-1]

    def _layout(self, counts: list[int]) -> tuple[Tensor, ...]:
        """Per row: domain, domain size, first row, last offset; per domain: 1/count."""
        domains = torch.repeat_interleave(torch.arange(self.k), torch.tensor(counts))
        domains = domains.to(self.device)
        inverse = torch.tensor([1.0 / c if c else 0.0 for c in counts], device=self.device)
        sizes = self.sizes[domains]
        return domains, sizes.float(), self.starts[domains], sizes - 1, inverse

    def _draw(
        self,
        domains: Tensor,
        sizes: Tensor | None = None,
        starts: Tensor | None = None,
        last: Tensor | None = None,
    ) -> Columns:
        u = torch.rand(domains.shape, generator=self.generator, device=self.device)
        if sizes is None:
            last = self.sizes[domains] - 1
            sizes, starts = (last + 1).float(), self.starts[domains]
        # u < 1, but u * size can round up to size in float32 for huge domains: clamp.
        offsets = torch.minimum((u * sizes).long(), last)
        batch = take(self.columns, starts + offsets)
        batch["domain"] = domains
        return batch

    def next(self, weights: Tensor | None = None) -> Columns:
        """The next batch; ``weights`` ``[K]`` (non-negative) is used when sampling by weights."""
        if self.sampling == "weights":
            if weights is None:
                raise ValueError("sampling='weights' needs the current domain weights")
            probs = weights.detach().float().clamp_min(0)
            domains = torch.multinomial(probs, self.batch_size, True, generator=self.generator)
            return self._draw(domains)
        return self._draw(*self.fixed[:4])

    def next_uniform(self) -> Columns:
        """A batch with an equal share of every domain (for hypergradients)."""
        return self._draw(*self.uniform[:4])

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


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
        self.generator = _generator(self.device, seed * 7919 + 104729 + rank)
        if self.batch_size is None and world_size > 1:
            # Each rank takes its own slice of the meta set.
            index = torch.arange(rank, self.n, world_size, device=self.device)
            self.columns = take(columns, index)

    def next(self) -> Columns:
        if self.batch_size is None:
            return self.columns
        index = torch.randint(
            0, self.n, (self.batch_size,), generator=self.generator, device=self.device
        )
        return take(self.columns, index)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
