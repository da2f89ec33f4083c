"""Data builders (the ``data`` config group) and the samplers the trainer draws batches from."""

from bilevel.data.domain_data import DomainData
from bilevel.data.noisy_domains import noisy_domains
from bilevel.data.samplers import DomainSampler, MetaSampler

__all__ = ["DomainData", "DomainSampler", "MetaSampler", "noisy_domains"]
