"""A model in two parts, a frozen ``prefix`` and a trainable ``suffix``, whose prefix output can
be cached per example (``trainer.cache_prefix=true``, :func:`bilevel.data.cache_prefix`).

    model = SplitModel(pretrained_backbone, nn.Linear(512, 10))   # the backbone is frozen
    model(x)                     # suffix(prefix(x)), as an ordinary model
    model(prefix_out=h)          # suffix(h): h = model.prefix(x), computed once per example

The prefix runs without gradient and in evaluation mode whichever mode the model is in (no
dropout, running statistics kept), so that its output for an example is one fixed tensor:
cached or not, the model computes the same function.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state

__all__ = ["SplitModel"]


class SplitModel(nn.Module):
    """``suffix(prefix(x))`` with a frozen prefix.

    Args:
        prefix: the frozen part (its parameters are set to ``requires_grad=False``).
        suffix: the trained part; it takes the prefix's output (a tensor).
    """

    def __init__(self, prefix: nn.Module, suffix: nn.Module) -> None:
        super().__init__()
        self.frozen = prefix
        self.suffix = suffix
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def prefix_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.frozen.named_parameters(prefix="frozen")

    @torch.no_grad()
    def prefix(self, x: Any) -> dict[str, Tensor]:
        """The prefix's output on ``x``, as the keyword arguments ``forward`` takes."""
        with module_state.evaluation(self.frozen):
            return {"prefix_out": self.frozen(x)}

    def forward(self, x: Any = None, *, prefix_out: Tensor | None = None) -> Any:
        if prefix_out is None:
            prefix_out = self.prefix(x)["prefix_out"]
        return self.suffix(prefix_out)
