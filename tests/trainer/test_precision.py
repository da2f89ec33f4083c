"""Float64 models train in float64 end to end; half-precision weights and models are refused or
told what to do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
)
from bilevel.data import DomainData, noisy_domains
from bilevel.errors import ConfigError
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from tests.trainer.helpers import SOLVERS, small_trainer


def float64_data():
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].double()
    return data


def own_inner(output, batch):  # a user's own losses, in whatever dtype the model computes
    return ((output - F.one_hot(batch["y"], output.shape[-1]).to(output.dtype)) ** 2).sum(1)


def own_outer(output, batch):
    return F.cross_entropy(output, batch["y"])


@pytest.mark.parametrize("key", list(SOLVERS))
def test_every_solver_trains_a_float64_model_in_float64(key):
    name = key.split("-")[0]
    data = float64_data()
    torch.manual_seed(0)
    model = MLP(**data.model_kwargs, hidden=8).double()
    weights = DomainWeights(data.names, dtype=torch.float64)
    trainer = BilevelTrainer(
        model,
        weights,
        build(name, **SOLVERS[key]),
        own_inner,
        own_outer,
        data,
        TrainerConfig(steps=10, outer_every=5, batch_size=16, progress=False, log_every=5),
    )
    grads = []
    original = trainer._apply
    trainer._apply = lambda update: (grads.append(update.grad), original(update))[1]
    summary = trainer.fit()
    assert summary["skipped_steps"] == 0
    assert grads and all(g.dtype == torch.float64 for g in grads)
    assert trainer.weights.logits.dtype == torch.float64


@pytest.fixture
def float64_by_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("key", ["first_order", "unrolled", "cg-warm", "sama", "cg-fd"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_run_under_a_float64_default_dtype_trains(float64_by_default, key, optimizer):
    """``torch.set_default_dtype(torch.float64)`` (as a user of float64 science code has it):
    the data, model and weights are made float64 by default; the non-finite guard's flags
    were too, and the fused check refused them ("inv_scale must be a float tensor")."""
    name = key.split("-")[0]
    if name == "unrolled" and optimizer == "adam":
        pytest.skip("unrolled differentiates plain SGD steps only")
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    assert data.train["x"].dtype == torch.float64
    make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    trainer = BilevelTrainer(
        MLP(**data.model_kwargs, hidden=8),
        DomainWeights(data.names, dtype=torch.float64),
        build(name, **SOLVERS[key]),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=10, outer_every=5, batch_size=16, progress=False, log_every=5),
        inner_optimizer=lambda params: make(params, lr=0.05),
    )
    summary = trainer.fit()
    assert summary["skipped_steps"] == 0 and summary["outer_updates"] == 2
    assert trainer.weights.logits.dtype == torch.float64
    assert summary["weights"] != dict.fromkeys(data.names, 0.25)


def test_float64_model_with_default_float32_weights_promotes():
    data = float64_data()
    model = MLP(**data.model_kwargs, hidden=8).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),  # float32 logits
        build("cg", iters=2),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=5, outer_every=5, batch_size=16, progress=False),
    )
    assert trainer.fit()["skipped_steps"] == 0


def test_domain_data_from_plain_tensors_float64_end_to_end():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    data = DomainData(
        names=["a", "b", "c"],
        train={"x": x, "y": y, "domain": torch.arange(60) % 3},
        meta={"x": x[:10], "y": y[:10]},
    )
    model = nn.Linear(3, 2).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names, dtype=torch.float64),
        build("neumann", iters=2),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=10, batch_size=9, progress=False),
    )
    assert trainer.fit()["steps"] == 10


def test_float16_weights_are_refused_with_one_line():
    """They trained silently wrong: Adam's eps and the squared hypergradients round to 0 in
    float16, and two domains of the default problem went to weight 0.0 (float32, bfloat16
    and float64 agree on other values). bfloat16 weights train."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    config = TrainerConfig(steps=10, progress=False)
    with pytest.raises(ConfigError, match="^weights: float16 weights train wrong"):
        small_trainer(config, weights=DomainWeights(data.names, dtype=torch.float16))
    small_trainer(config, weights=DomainWeights(data.names, dtype=torch.bfloat16)).fit()


def test_a_half_precision_model_is_told_to_use_autocast_instead():
    """A bfloat16 MLP trained with exit 0 and stayed at chance: its SGD steps were smaller
    than half a unit in the last place of its parameters, rounded away."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].bfloat16()
    model = MLP(**data.model_kwargs, hidden=8).bfloat16()
    notes = small_trainer(TrainerConfig(steps=5, progress=False), data=data, model=model).notes
    assert any("trainable parameters are bfloat16" in n and "precision=bf16" in n for n in notes)
    plain = small_trainer(TrainerConfig(steps=5, progress=False)).notes
    assert not any("trainable parameters are" in n for n in plain)
