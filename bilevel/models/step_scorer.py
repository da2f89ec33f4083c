"""A per-step scoring head for process reward models over step features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from bilevel.models.mlp import MLP

__all__ = ["StepScorer"]


class StepScorer(nn.Module):
    """Scores every step of a solution: ``[B, S, in_dim]`` -> step logits ``[B, S]``.

    Each step's features are scored by the same MLP (a step's features should carry the context
    it needs, e.g. the value it starts from).
    """

    def __init__(self, in_dim: int, hidden: int | Sequence[int] = 128, activation: str = "relu"):
        super().__init__()
        self.in_dim = in_dim
        self.mlp = MLP(in_dim, 1, hidden=hidden, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"StepScorer scores the steps of each solution: x must be step features "
                f"[B, S, {self.in_dim}], got {shape}"
            )
        b, s, d = x.shape
        return self.mlp(x.reshape(b * s, d)).view(b, s)
