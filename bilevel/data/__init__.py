"""The domains: ``DomainData`` (K named domains, meta and test sets, in memory), the samplers
the trainer draws batches from, test-set evaluation, and the ``noisy_domains`` builder of the
``data`` config group. It imports only the core."""

from bilevel.data.columns import domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.noisy_domains import noisy_domains
from bilevel.data.prefix_cache import cache_prefix
from bilevel.data.samplers import DomainSampler, MetaSampler

__all__ = [
    "DomainData",
    "DomainSampler",
    "MetaSampler",
    "cache_prefix",
    "domain_columns",
    "noisy_domains",
]
