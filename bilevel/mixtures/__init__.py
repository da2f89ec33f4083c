"""Offline mixture search beside the online methods: propose random mixtures, train a small
proxy on each with its weights fixed, fit a regression from mixture to target, and pick the
mixture it predicts best (RegMix; the data mixing law). ``bilevel-mix`` is its command line.

It imports the core only (errors, files); the CLI imports it.
"""

from bilevel.mixtures.regressors import MODELS, LightGBM, Linear, MixingLaw
from bilevel.mixtures.search import (
    MixtureFit,
    cross_validate,
    fit_mixtures,
    floored,
    load_fit,
    propose,
    search,
    spearman,
)
from bilevel.mixtures.tables import Table, join, read_metrics, read_mixtures, write_table

__all__ = [
    "MODELS",
    "LightGBM",
    "Linear",
    "MixingLaw",
    "MixtureFit",
    "Table",
    "cross_validate",
    "fit_mixtures",
    "floored",
    "join",
    "load_fit",
    "propose",
    "read_metrics",
    "read_mixtures",
    "search",
    "spearman",
    "write_table",
]
