"""Trainers and settings shared by the trainer's tests."""

import torch

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
)
from bilevel.data import noisy_domains
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build

SOLVERS = {
    "first_order": {},
    "unrolled": {"steps": 2},
    "neumann": {"iters": 3},
    "cg": {"iters": 3},
    "sama": {},
    "cg-warm": {"iters": 1, "warm_start": True},
    "first_order-fd": {"products": "finite_difference"},
    "cg-fd": {"iters": 2, "products": "finite_difference"},
}


def scheduled(solver, inner_lr=None, steps=10):
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    model = MLP(**data.model_kwargs, hidden=8)
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        build(solver, **({"steps": 2} if solver == "unrolled" else {})),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=steps, outer_every=5, batch_size=16, progress=False, inner_lr=inner_lr),
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.2),
        inner_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
    )
    return trainer


def small_trainer(
    config,
    solver=None,
    outer_loss=cross_entropy,
    activation="relu",
    data=None,
    run_dir=None,
    model=None,
    inner_loss=per_example_cross_entropy,
    weights=None,
    **kwargs,
):
    """A first_order trainer of a small MLP (or ``model``) on a small noisy_domains problem;
    ``kwargs`` go to :class:`BilevelTrainer`."""
    # `is None`, not `or`: a compiled module answers truthiness with "does not support len()"
    data = (
        noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0) if data is None else data
    )
    return BilevelTrainer(
        MLP(**data.model_kwargs, hidden=8, activation=activation) if model is None else model,
        DomainWeights(data.names) if weights is None else weights,
        build("first_order") if solver is None else solver,
        inner_loss,
        outer_loss,
        data,
        config,
        run_dir=run_dir,
        **kwargs,
    )


def make_trainer(inner_loss, tmp_path=None, **config):
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    model = MLP(**data.model_kwargs, hidden=16)
    cfg = TrainerConfig(
        **{
            "steps": 40,
            "outer_every": 5,
            "batch_size": 32,
            "log_every": 5,
            "progress": False,
            **config,
        }
    )
    return BilevelTrainer(
        model,
        DomainWeights(data.names),
        build("first_order"),
        inner_loss,
        cross_entropy,
        data,
        cfg,
        run_dir=tmp_path,
    )
