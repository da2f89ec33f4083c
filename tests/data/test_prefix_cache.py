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


def test_a_stored_prefix_is_computed_once_and_read_back_exactly(tmp_path):
    """Two runs on the same data and base model: the first writes each split's cache to the
    store, the second reads all of them and trains exactly as the first."""
    store = tmp_path / "prefix"

    def fit(model):
        data = _data()
        trainer = BilevelTrainer(
            model,
            bilevel.DomainWeights(data.names),
            build("first_order"),
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(
                steps=20,
                batch_size=32,
                progress=False,
                cache_prefix=True,
                prefix_cache_dir=str(store),
            ),
        )
        return trainer, trainer.fit()

    first, want = fit(_model())
    second, got = fit(_model())
    assert want["info"]["prefix_cache"]["written"] == ["train", "meta", "test"]
    assert want["info"]["prefix_cache"]["read"] == []
    assert got["info"]["prefix_cache"]["read"] == ["train", "meta", "test"]
    assert got["info"]["prefix_cache"]["written"] == []
    assert len(list(store.glob("*.pt"))) == 3 and not list(store.glob("*.tmp"))
    for split in ("train", "meta", "test"):
        a, b = getattr(first.data, split)["x"], getattr(second.data, split)["x"]
        assert torch.equal(a["prefix_out"], b["prefix_out"])
    assert got["weights"] == want["weights"] and got["test"] == want["test"]


def test_a_stored_prefix_is_keyed_by_the_prefix_and_the_inputs(tmp_path):
    """Another base model, other inputs, or a stale file under the right name: computed again."""
    data = _data()
    cache_prefix(_model(), data, store=tmp_path)
    other = _model()
    with torch.no_grad():
        other.frozen[0].weight.add_(0.01)  # another checkpoint of the base model
    assert cache_prefix(other, data, store=tmp_path).info["prefix_cache"]["read"] == []
    shifted = noisy_domains(per_domain=64, meta_size=32, test_size=64, dim=8, seed=1)
    assert cache_prefix(_model(), shifted, store=tmp_path).info["prefix_cache"]["read"] == []
    # the suffix is not part of the key: it trains, the prefix's output does not depend on it
    suffix_changed = _model()
    with torch.no_grad():
        suffix_changed.suffix[1].weight.mul_(2)
    again = cache_prefix(suffix_changed, data, store=tmp_path)
    assert again.info["prefix_cache"]["read"] == ["train", "meta", "test"]
    # a file that does not continue the model (written by another version of its code) is
    # computed again and replaced, never trained on
    for path in tmp_path.glob("*.pt"):
        stored = torch.load(path, weights_only=True)
        torch.save({"prefix_out": stored["prefix_out"] + 1.0}, path)
    fresh = cache_prefix(_model(), data, store=tmp_path)
    assert fresh.info["prefix_cache"]["read"] == []
    plain = cache_prefix(_model(), data)
    assert torch.equal(fresh.train["x"]["prefix_out"], plain.train["x"]["prefix_out"])


def test_a_store_without_the_cache_is_refused():
    with pytest.raises(ConfigError, match="needs trainer.cache_prefix=true"):
        TrainerConfig(prefix_cache_dir="cache").validate()
