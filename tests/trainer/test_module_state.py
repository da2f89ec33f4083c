"""Running statistics move with the inner steps only, and evaluations give every submodule its own
mode back."""

from pathlib import Path

import pytest
import torch
from torch import nn

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
)
from bilevel.cli import format_summary
from bilevel.data import noisy_domains
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.solvers import build
from tests.trainer.helpers import small_trainer


@pytest.mark.parametrize(
    "solver,options",
    [
        ("first_order", {}),
        ("cg", {}),
        ("neumann", {"iters": 1, "warm_start": True}),
        ("unrolled", {"steps": 2}),
        ("sama", {}),
        ("doge", {}),
        ("first_order", {"products": "finite_difference"}),
        ("cg", {"products": "finite_difference"}),
        ("odm", {}),
        ("loss_reweighting", {}),
    ],
)
def test_running_statistics_are_moved_by_the_inner_steps_only(solver, options):
    """BatchNorm's running statistics: the meta-loss forward, finite-difference passes at
    perturbed parameters and the setup's loss check updated them too (26 to 106 updates for 20
    inner steps), pulling the statistics used at evaluation towards the meta set."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(data.model_kwargs["in_dim"], 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, data.model_kwargs["out_dim"]),
    )
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        build(solver, **options),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=20, outer_every=5, batch_size=16, progress=False),
    )
    summary = trainer.fit()
    assert summary["outer_updates"] == (0 if solver == "loss_reweighting" else 4)
    assert int(model[1].num_batches_tracked) == 20
    # loss_reweighting's table said "no outer step ran: trainer.steps < trainer.outer_every"
    assert summary["moves_weights"] == (solver != "loss_reweighting")
    title = format_summary(summary, Path("run")).strip().splitlines()[0]
    assert ("kept as set: loss_reweighting weights examples" in title) == (
        solver == "loss_reweighting"
    )
    assert "no outer step ran" not in title


def test_evaluation_gives_every_submodule_its_own_mode_back():
    """``model.eval()`` ... ``model.train(was)`` around the meta loss and the test metrics set
    every submodule to training: a BatchNorm the user froze (eval mode) for fine-tuning trained
    from the first log line on. An evaluator of the user's that leaves the model in eval mode
    must not stop the training that follows either (dropout off, statistics frozen)."""
    from bilevel.data.evaluate import classification_metrics

    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model[1].eval()  # frozen statistics
    frozen = model[1].running_mean.clone()

    def careless(module, columns, device):  # forgets to give the mode back
        module.eval()
        return classification_metrics(module, columns, device)

    data.evaluate = careless
    config = TrainerConfig(
        steps=10, outer_every=5, eval_every=5, log_every=5, batch_size=16, progress=False
    )
    small_trainer(config, data=data, model=model).fit()
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, frozen)
