"""What per-example weights share: the logs' view of them.

A per-example weighting (:class:`~bilevel.weights.MetaWeightNet`,
:class:`~bilevel.weights.InstanceTable`) gives each example of a batch a coefficient c_i (mean 1
over the batch) by :meth:`example_coefficients`; its outer variables are one flat parameter,
``logits``, so the outer optimizer, checkpoints and rank broadcasts treat it like the domain
weights' logits. For the logs and the summary, :meth:`value` and :meth:`as_dict` report the
mean coefficient of each domain's examples in the most recent batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PerExampleWeights"]


class PerExampleWeights(nn.Module):
    """Base of the per-example weightings: names, the last batch's domain means."""

    per_example = True
    #: the batch must carry each example's row index (``batch["row"]``)
    needs_rows = False

    def __init__(self, names: list[str], device: torch.device | str | None, dtype) -> None:
        super().__init__()
        self.names = names
        self.k = len(names)
        self.register_buffer("last_means", torch.full((self.k,), 1.0, device=device, dtype=dtype))

    def __len__(self) -> int:
        return self.k

    def example_coefficients(
        self, losses: Tensor, batch: dict, flat: Tensor | None = None
    ) -> Tensor:
        """c_i ``[B]`` for the batch's examples, differentiable in ``flat`` (default: the
        logits)."""
        raise NotImplementedError

    @torch.no_grad()
    def record(self, coefficients: Tensor, domain: Tensor) -> None:
        """Remember the mean coefficient of each domain in this batch (for the logs)."""
        sums = torch.zeros(self.k, device=coefficients.device, dtype=coefficients.dtype)
        sums.index_add_(0, domain, coefficients)
        counts = torch.zeros_like(sums).index_add_(0, domain, torch.ones_like(coefficients))
        means = torch.where(counts > 0, sums / counts.clamp_min(1), self.last_means.to(sums))
        self.last_means.copy_(means.to(self.last_means.dtype))

    def value(self) -> Tensor:
        """Mean weight of each domain's examples in the last batch ``[K]`` (for logging)."""
        return self.last_means

    forward = value

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.last_means.detach().cpu().tolist(), strict=True))
