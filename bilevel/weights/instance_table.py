"""One learnable weight per training example: DreamPRM-1.5's instance table.

Domain weights give every example of a domain one weight; a meta-weight net computes a weight
from what it sees of an example. An instance table instead *stores* a weight per example,
learned directly by the hypergradient:

    c_i = s(t_{r_i}) / mean_j s(t_{r_j})       (the batch's examples j; r_i: row of example i)

with ``t`` the table ``[N]`` (:attr:`InstanceTable.logits`) and s = softplus (default; DreamPRM
uses a softplus of its weights) or sigmoid. The inner objective is the batch mean of c_i l_i,
the solvers give dM/dc_i through the same one-product path as the meta-weight net
(:mod:`bilevel.methods.per_example`), and dM/dt is nonzero only at the rows the batch held:
with :class:`~bilevel.outer.LazyAdam` (the ``weights=instance_table`` preset's outer
optimizer) only those rows move. Memory: N numbers on the device, plus the optimizer's moments;
checkpointed with the run.

The batch must say which rows it holds: the trainer adds a ``row`` column (int64 ``[N]``,
0..N-1 in the order of ``data.train``) for weights with ``needs_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.errors import is_finite_number, is_integer
from bilevel.weights.domain import domain_names
from bilevel.weights.per_example import PerExampleWeights

__all__ = ["InstanceTable"]

ACTIVATIONS = ("softplus", "sigmoid")


class InstanceTable(PerExampleWeights):
    """A learnable weight for each of ``size`` training examples.

    Args:
        names: the domain names (the data's; for the logs' per-domain means).
        size: N, the number of training examples (the CLI reads it from the data).
        activation: ``softplus`` or ``sigmoid`` (what maps a table entry to a weight > 0).
        init_weight: every example's initial weight s(t) before normalization (softplus: > 0;
            sigmoid: in (0, 1)).
        device, dtype: where and how the table is stored.
    """

    parametrization = "instance_table"
    needs_rows = True

    def __init__(
        self,
        names: Sequence[str],
        size: int,
        activation: str = "softplus",
        init_weight: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        names = domain_names(names, type(self).__name__)
        super().__init__(names, device, dtype)
        if not is_integer(size) or size < 1:
            raise ValueError(f"InstanceTable: size must be an integer >= 1, got {size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"InstanceTable: activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {activation!r}"
            )
        top = math.inf if activation == "softplus" else 1.0
        init = init_weight
        if not (is_finite_number(init) and 0 < init < top):
            raise ValueError(
                f"InstanceTable: init_weight must lie in (0, {top}) for {activation}, got {init!r}"
            )
        self.size = int(size)
        self.activation = activation
        # the entry t with s(t) = init: softplus^-1(y) = y + log(1 - exp(-y)); logit for sigmoid
        start = (
            init + math.log(-math.expm1(-init))
            if activation == "softplus"
            else math.log(init / (1 - init))
        )
        self.logits = nn.Parameter(torch.full((self.size,), start, device=device, dtype=dtype))

    def weight(self, flat: Tensor) -> Tensor:
        return F.softplus(flat) if self.activation == "softplus" else torch.sigmoid(flat)

    def example_coefficients(
        self, losses: Tensor, batch: dict, flat: Tensor | None = None
    ) -> Tensor:
        """c_i = s(t_{r_i}) / mean over the batch ``[B]``, differentiable in ``flat``."""
        rows = batch.get("row")
        if rows is None:
            raise ValueError("InstanceTable: the batch has no 'row' column (the trainer adds it)")
        table = self.logits if flat is None else flat
        v = self.weight(table[rows])
        return v / v.mean().clamp_min(1e-12)

    @torch.no_grad()
    def table(self) -> Tensor:
        """Every example's weight s(t) ``[N]`` (before the batch normalization)."""
        return self.weight(self.logits)

    def extra_repr(self) -> str:
        return f"names={self.names}, size={self.size}, activation={self.activation}"
