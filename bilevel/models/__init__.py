"""The shipped models, built by the ``model`` config group: an MLP, a tiny GPT, a step scorer
for process reward models, and wrappers of pretrained Hugging Face checkpoints (``hf``). It
imports only the core."""

from bilevel.models.mlp import MLP
from bilevel.models.step_scorer import StepScorer
from bilevel.models.tiny_gpt import TinyGPT

__all__ = ["MLP", "StepScorer", "TinyGPT"]
