"""A frozen prefix computed once per example: the same run as without the cache."""

import copy

import pytest
import torch
from torch import nn

import bilevel
from bilevel import BilevelTrainer, TrainerConfig
from bilevel.data import DomainData, cache_prefix, noisy_domains
from bilevel.errors import ConfigError
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import SplitModel
from bilevel.solvers import build


def _model():
    torch.manual_seed(0)
    # dropout in the prefix: it runs in evaluation mode, cached or not
    prefix = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 16))
    return SplitModel(prefix, nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))


def _data():
    return noisy_domains(per_domain=64, meta_size=32, test_size=64, dim=8, seed=0)


def _fit(model, data, cache, solver="cg"):
    trainer = BilevelTrainer(
        model,
        bilevel.DomainWeights(data.names),
        build(solver, iters=3) if solver == "cg" else build(solver),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=30, batch_size=32, progress=False, cache_prefix=cache),
    )
    return trainer, trainer.fit()


@pytest.mark.parametrize("solver", ["cg", "first_order"])
def test_a_cached_prefix_trains_exactly_as_the_uncached_model(solver):
    model = _model()
    plain, want = _fit(copy.deepcopy(model), _data(), False, solver)
    cached, got = _fit(copy.deepcopy(model), _data(), True, solver)
    assert got["weights"] == pytest.approx(want["weights"], rel=1e-5, abs=1e-7)
    assert got["meta_loss"] == pytest.approx(want["meta_loss"], rel=1e-5)
    assert got["test"] == pytest.approx(want["test"], rel=1e-5)
    for a, b in zip(plain.module.parameters(), cached.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got["info"]["prefix_cache"]["splits"] == ["train", "meta", "test"]
    assert cached.data.train["x"]["prefix_out"].shape == (256, 16)


def test_the_cache_is_refused_where_it_would_be_wrong():
    data = _data()
    with pytest.raises(ConfigError, match="has no prefix"):
        cache_prefix(nn.Linear(8, 2), data)
    model = _model()
    model.frozen[0].weight.requires_grad_(True)  # a prefix that trains goes stale
    with pytest.raises(ConfigError, match="prefix has trainable parameters"):
        cache_prefix(model, data)

    class Noisy(SplitModel):  # a prefix whose output is not one fixed tensor
        def prefix(self, x):
            return {"prefix_out": self.frozen(x) + torch.randn(len(x), 16)}

    noisy = Noisy(_model().frozen, nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="differs from its output on the raw input"):
        cache_prefix(noisy, data)


def test_the_original_data_is_left_as_it_was():
    data = _data()
    before = data.train["x"].clone()
    cached = cache_prefix(_model(), data)
    assert torch.equal(data.train["x"], before) and "prefix_cache" not in data.info
    assert isinstance(cached, DomainData) and set(cached.train["x"]) == {"prefix_out"}


def test_a_frozen_hf_prefix_gives_the_encoders_own_output():
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from bilevel.models.hf import HFClassifier

    torch.manual_seed(0)
    whole = HFClassifier(head="step", trainable="all")
    split = HFClassifier(head="step", trainable="all", frozen_layers=4)
    split.load_state_dict(whole.state_dict())
    ids = torch.randint(100, 2000, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    x = {
        "input_ids": ids,
        "attention_mask": mask,
        "step_positions": torch.tensor([[3, 7, 12], [2, 5, 14], [4, 9, 19]]),
    }
    whole.eval(), split.eval()
    torch.testing.assert_close(split(**x), whole(**x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split(**split.prefix(x)), whole(**x), rtol=1e-5, atol=1e-6)
    trained = {n for n, p in split.named_parameters() if p.requires_grad}
    assert trained and all(
        "layer.4" in n or "layer.5" in n or n.startswith("head") for n in trained
    )
    with pytest.raises(ConfigError, match="model.frozen_layers"):
        HFClassifier(head="step", trainable="lora", frozen_layers=2)
