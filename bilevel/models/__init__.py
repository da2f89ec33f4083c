"""Models built by the ``model`` config group."""

from bilevel.models.mlp import MLP
from bilevel.models.step_scorer import StepScorer
from bilevel.models.tiny_gpt import TinyGPT

__all__ = ["MLP", "StepScorer", "TinyGPT"]
