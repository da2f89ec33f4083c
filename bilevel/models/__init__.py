"""Models built by the ``model`` config group."""

from bilevel.models.mlp import MLP

__all__ = ["MLP"]
