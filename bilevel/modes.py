"""Evaluation passes leave every submodule in the training mode it had.

``model.eval()`` before an evaluation and ``model.train(was)`` after it is the usual idiom, and it
is wrong for a model whose submodules do not share one mode: ``train(True)`` sets *every*
submodule to training, so a part the user keeps in eval mode on purpose (BatchNorm layers frozen
for fine-tuning, a frozen encoder with its dropout off) trains from the first evaluation on,
silently. These context managers save each submodule's own flag and put it back, also when the
evaluation raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluation", "kept"]


@contextlib.contextmanager
def kept(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, anything may change the modes (``module.eval()`` in a user's evaluator); on exit
    every submodule has its own flag back."""
    saved = [(sub, sub.training) for sub in module.modules()]
    try:
        yield module
    finally:
        for sub, flag in saved:
            sub.training = flag


@contextlib.contextmanager
def evaluation(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside; on exit every submodule has its own flag back."""
    with kept(module):
        module.eval()
        yield module
