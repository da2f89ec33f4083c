"""A plain multi-layer perceptron for vector inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


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
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = []
        prev = in_dim
        for width in widths:
            layers += [nn.Linear(prev, width), ACTIVATIONS[activation]()]
            prev = width
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
