"""Learn domain weights inside Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, and what is
built on them): ``class MyTrainer(DomainWeightsMixin, Trainer)``. The trainer's own loop,
logging, checkpoints and launchers (accelerate, DDP) do the rest; see the docs' "Inside Hugging
Face Trainer" page."""

from bilevel.integrations.hf.mixin import DomainWeightsMixin
from bilevel.integrations.hf.sampling import WeightedDomainSampler

__all__ = ["DomainWeightsMixin", "WeightedDomainSampler"]
