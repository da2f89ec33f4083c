"""The shipped models, built by the ``model`` config group: an MLP, a tiny GPT, a step scorer
for process reward models, a model split into a frozen prefix and a trained suffix
(``SplitModel``, whose prefix can be cached per example), and wrappers of pretrained Hugging
Face checkpoints (``hf``). It imports only the core."""

from bilevel.models.mlp import MLP
from bilevel.models.split import SplitModel
from bilevel.models.step_scorer import StepScorer
from bilevel.models.tiny_gpt import TinyGPT

__all__ = ["MLP", "SplitModel", "StepScorer", "TinyGPT"]
