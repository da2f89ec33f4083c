"""bilevel: learn domain weights by bilevel meta-learning.

lower level:  theta*(w) = argmin_theta sum_k w_k L_k(theta)
upper level:  min_lambda M(theta*(p(lambda)))

Public API: :class:`DomainWeights`, :func:`hypergradient`, :mod:`bilevel.solvers`,
:class:`BilevelTrainer`.

The package is layered; each part imports only the parts below it (``lint-imports`` checks it):

====================  ===========================================================================
``cli/``              the command line: Hydra app, run and sweep folders, resume, sweep tables
``trainer/``          the training loop and everything only it uses
``methods/``          outer methods: what turns a window of inner steps into an outer update
``solvers/``          hypergradient solvers and the derivative products they are built on
``strategies/``       how a run is spread over processes (ddp, fsdp), checkpoint files
``data/``             domains in memory: ``DomainData``, samplers, evaluation
``logging/``          what a run leaves behind: its folder, metrics.jsonl, summary, plots
``losses/``           the shipped inner and outer losses
``models/``           the shipped models (MLP, TinyGPT, step scorer, Hugging Face wrappers)
``weights/``          the outer variables: domain weights, a meta-weight net
the modules here      the core: ``hypergradient``, ``functional``, ``optim``, ``outer``,
                      ``module_state``, ``files``, ``errors``
====================  ===========================================================================
"""

import sys as _sys

from bilevel.functional import (
    make_outer_loss,
    make_per_domain_loss,
    mean_over_ranks,
    segment_mean,
    trainable_params,
)
from bilevel.hypergradient import hypergradient
from bilevel.outer import MirrorDescent
from bilevel.trainer import BilevelTrainer, TrainerConfig
from bilevel.weights import DomainWeights, MetaWeightNet
from bilevel.weights import meta_weight_net as _meta_weight_net

__version__ = "0.1.0"

__all__ = [
    "BilevelTrainer",
    "DomainWeights",
    "MetaWeightNet",
    "MirrorDescent",
    "TrainerConfig",
    "hypergradient",
    "make_outer_loss",
    "make_per_domain_loss",
    "mean_over_ranks",
    "segment_mean",
    "trainable_params",
]

# Module paths of earlier releases that configs name in ``_target_``
# (``weights._target_=bilevel.meta_weight_net.MetaWeightNet``) keep resolving.
_sys.modules.setdefault("bilevel.meta_weight_net", _meta_weight_net)
