"""Per-example weights from a small network: Meta-Weight-Net (Shu et al., NeurIPS 2019).

Domain weights give every example of a domain the same weight. A meta-weight net instead maps
each example's current loss (and, optionally, its domain) to a weight,

    V_i = sigmoid(MLP([l_i, onehot(d_i)]; phi)),      c_i = V_i / mean_j V_j,

and the inner objective is the batch mean of c_i l_i (the loss fed to the net is detached, as in
the original). Its parameters phi are the outer variables: the same solvers learn them, with
examples in place of domains as the units of the one J_L v product (see
:mod:`bilevel.methods.per_example`).

For the trainer, phi is held as ONE flat parameter, :attr:`MetaWeightNet.logits`, so the outer
optimizer, checkpoints and rank broadcasts treat it like the domain-weight logits.
:meth:`value` and :meth:`as_dict` report the mean weight c of each domain's examples in the
most recent batch (for logs and the summary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.errors import is_bool, is_integer
from bilevel.weights.domain import domain_names

__all__ = ["MetaWeightNet"]


class MetaWeightNet(nn.Module):
    """Loss (and domain) -> per-example weight.

    Args:
        names: the domain names (the data's).
        hidden: width of the hidden layer.
        use_domain: also feed each example's domain (one-hot).
        device: where the parameters live.
        dtype: the parameters' dtype.
    """

    parametrization = "meta_weight_net"
    per_example = True

    def __init__(
        self,
        names: Sequence[str],
        hidden: int = 100,
        use_domain: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        names = domain_names(names, type(self).__name__)
        if not is_integer(hidden) or hidden < 1:
            raise ValueError(f"MetaWeightNet: hidden must be an integer >= 1, got {hidden!r}")
        self.names = names
        self.k = len(names)
        self.hidden = hidden
        if not is_bool(use_domain):
            raise ValueError(f"MetaWeightNet: use_domain must be true or false, got {use_domain!r}")
        self.use_domain = bool(use_domain)
        inputs = 1 + (self.k if self.use_domain else 0)
        self.shapes = [(hidden, inputs), (hidden,), (1, hidden), (1,)]
        gen = torch.Generator().manual_seed(0)
        parts = []
        for shape in self.shapes:
            fan_in = shape[1] if len(shape) == 2 else hidden
            bound = 1 / math.sqrt(fan_in)
            parts.append((torch.rand(shape, generator=gen) * 2 - 1).flatten() * bound)
        # start near V = 0.5 for every example: the output bias at 0
        parts[-1].zero_()
        self.logits = nn.Parameter(torch.cat(parts).to(device=device, dtype=dtype))
        self.register_buffer("last_means", torch.full((self.k,), 1.0, device=device, dtype=dtype))

    def __len__(self) -> int:
        return self.k

    def _layers(self, flat: Tensor) -> list[Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [t.view(s) for t, s in zip(flat.split(sizes), self.shapes)]

    def raw(self, losses: Tensor, domain: Tensor, flat: Tensor | None = None) -> Tensor:
        """V_i in (0, 1), ``[B]``, differentiable in ``flat`` (default: :attr:`logits`)."""
        w1, b1, w2, b2 = self._layers(self.logits if flat is None else flat)
        feats = [losses.detach().to(w1.dtype)[:, None]]
        if self.use_domain:
            feats.append(F.one_hot(domain, self.k).to(w1.dtype))
        x = torch.cat(feats, 1)
        return torch.sigmoid(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)).squeeze(1)

    def coefficients(self, losses: Tensor, domain: Tensor, flat: Tensor | None = None) -> Tensor:
        """c_i = V_i / mean(V) ``[B]`` (mean 1: the step size is the optimizer's)."""
        v = self.raw(losses, domain, flat)
        return v / v.mean().clamp_min(1e-12)

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

    def extra_repr(self) -> str:
        return f"names={self.names}, hidden={self.hidden}, use_domain={self.use_domain}"
