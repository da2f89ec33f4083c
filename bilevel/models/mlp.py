"""A plain multi-layer perceptron for vector inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from bilevel.errors import is_integer

__all__ = ["MLP", "check_sizes"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def check_sizes(model: str, minimum: int = 1, **sizes: int) -> None:
    """Each size must be an integer >= ``minimum``: a zero-width layer builds and trains without
    error, and silently learns nothing (its output is the last bias)."""
    for name, value in sizes.items():
        if not is_integer(value) or value < minimum:
            raise ValueError(f"{model}: {name} must be an integer >= {minimum}, got {value!r}")


class MLP(nn.Module):
    """``in_dim -> hidden... -> out_dim`` with ``activation`` between layers.

    Args:
        in_dim, out_dim: input features and outputs (classes); the data builder supplies them.
        hidden: width of each hidden layer (an int for one layer).
        activation: ``"relu"`` | ``"tanh"`` | ``"gelu"``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int | Sequence[int] = 64, activation: str = "relu"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if isinstance(hidden, str):
            raise ValueError(
                f"MLP: hidden must be an integer or a list of integers, got {hidden!r}"
            )
        widths = list(hidden) if hasattr(hidden, "__iter__") else [hidden]
        check_sizes("MLP", in_dim=in_dim, out_dim=out_dim)
        check_sizes(
            "MLP",
            **{f"hidden[{i}]" if len(widths) > 1 else "hidden": w for i, w in enumerate(widths)},
        )
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        prev = in_dim
        for width in widths:
            layers += [nn.Linear(prev, width), ACTIVATIONS[activation]()]
            prev = width
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, ...]`` with ``in_dim`` features per row (flattened) -> ``[B, out_dim]``."""
        if not isinstance(x, Tensor) or x.dim() < 2 or math.prod(x.shape[1:]) != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"MLP reads x [B, {self.in_dim}] ({self.in_dim} features per row), got {shape}"
            )
        return self.net(x.flatten(1))
