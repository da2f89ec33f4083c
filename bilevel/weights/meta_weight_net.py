"""Per-example weights from a small network: Meta-Weight-Net (Shu et al., NeurIPS 2019), and
DreamPRM-1.5's instance net (the same net, also fed each example's own features).

Domain weights give every example of a domain the same weight. A meta-weight net instead maps
each example's current loss (and, optionally, its domain and a feature column of the data) to
a weight,

    V_i = sigmoid(MLP([l_i, onehot(d_i), f_i]; phi)),      c_i = V_i / mean_j V_j,

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
from bilevel.weights.per_example import PerExampleWeights

__all__ = ["MetaWeightNet"]


class MetaWeightNet(PerExampleWeights):
    """Loss (and domain, and features) -> per-example weight.

    Args:
        names: the domain names (the data's).
        hidden: width of the hidden layer.
        use_domain: also feed each example's domain (one-hot).
        features: also feed this column of the training data (float ``[N, F]`` or ``[N]``):
            DreamPRM-1.5's instance net (``weights=instance_net``).
        feature_dim: F (the CLI reads it from the data).
        device: where the parameters live.
        dtype: the parameters' dtype.
    """

    parametrization = "meta_weight_net"

    def __init__(
        self,
        names: Sequence[str],
        hidden: int = 100,
        use_domain: bool = True,
        features: str | None = None,
        feature_dim: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        names = domain_names(names, type(self).__name__)
        super().__init__(names, device, dtype)
        if not is_integer(hidden) or hidden < 1:
            raise ValueError(f"MetaWeightNet: hidden must be an integer >= 1, got {hidden!r}")
        if features is not None and not (is_integer(feature_dim) and feature_dim >= 1):
            raise ValueError(
                f"MetaWeightNet: features={features!r} needs feature_dim >= 1, got {feature_dim!r}"
            )
        self.features = features
        self.feature_dim = int(feature_dim) if features is not None else 0
        self.hidden = hidden
        if not is_bool(use_domain):
            raise ValueError(f"MetaWeightNet: use_domain must be true or false, got {use_domain!r}")
        self.use_domain = bool(use_domain)
        inputs = 1 + (self.k if self.use_domain else 0) + self.feature_dim
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

    def _layers(self, flat: Tensor) -> list[Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [t.view(s) for t, s in zip(flat.split(sizes), self.shapes)]

    def raw(
        self,
        losses: Tensor,
        domain: Tensor,
        flat: Tensor | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """V_i in (0, 1), ``[B]``, differentiable in ``flat`` (default: :attr:`logits`)."""
        w1, b1, w2, b2 = self._layers(self.logits if flat is None else flat)
        feats = [losses.detach().to(w1.dtype)[:, None]]
        if self.use_domain:
            feats.append(F.one_hot(domain, self.k).to(w1.dtype))
        if self.feature_dim:
            if features is None:
                raise ValueError(f"MetaWeightNet: the batch has no column {self.features!r}")
            feats.append(features.detach().to(w1.dtype).reshape(len(losses), -1))
        x = torch.cat(feats, 1)
        return torch.sigmoid(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)).squeeze(1)

    def coefficients(
        self,
        losses: Tensor,
        domain: Tensor,
        flat: Tensor | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """c_i = V_i / mean(V) ``[B]`` (mean 1: the step size is the optimizer's)."""
        v = self.raw(losses, domain, flat, features)
        return v / v.mean().clamp_min(1e-12)

    def example_coefficients(
        self, losses: Tensor, batch: dict, flat: Tensor | None = None
    ) -> Tensor:
        features = batch.get(self.features) if self.features else None
        return self.coefficients(losses, batch["domain"], flat, features)

    def extra_repr(self) -> str:
        said = f"names={self.names}, hidden={self.hidden}, use_domain={self.use_domain}"
        return said + (f", features={self.features!r}" if self.features else "")
