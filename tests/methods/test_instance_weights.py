"""DreamPRM-1.5's instance-level weights: the instance table (one weight per example) and the
instance net (a meta-weight net of each example's features), and the lazy Adam that moves only
the rows a batch held."""

import pytest
import torch

from bilevel import BilevelTrainer, TrainerConfig
from bilevel.data import DomainData
from bilevel.errors import ConfigError
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.outer import LazyAdam
from bilevel.solvers import build
from bilevel.weights import InstanceTable, MetaWeightNet


def test_lazy_adam_moves_only_the_rows_with_a_gradient_and_is_adam_on_them():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(6))
    dense = torch.nn.Parameter(table.detach()[:2].clone())
    lazy, adam = LazyAdam([table], lr=0.1), torch.optim.Adam([dense], lr=0.1)
    untouched = table.detach()[2:].clone()
    for _ in range(5):
        g = torch.randn(2)
        table.grad = torch.cat([g, torch.zeros(4)])
        dense.grad = g.clone()
        lazy.step(), adam.step()
    torch.testing.assert_close(table.detach()[:2], dense.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(table.detach()[2:], untouched)
    assert lazy.state[table]["steps"].tolist() == [5, 5, 0, 0, 0, 0]
    # a skipped step (found_inf) changes nothing
    before = table.detach().clone()
    lazy.found_inf = torch.ones(())
    table.grad = torch.ones(6)
    lazy.step()
    assert torch.equal(table.detach(), before)


def test_the_instance_table_weights_only_its_batch_rows():
    table = InstanceTable(["a", "b"], size=10, init_weight=2.0)
    assert torch.allclose(table.table(), torch.full((10,), 2.0))
    batch = {"row": torch.tensor([1, 4, 4, 7]), "domain": torch.tensor([0, 1, 1, 0])}
    flat = table.logits.detach().clone().requires_grad_(True)
    c = table.example_coefficients(torch.ones(4), batch, flat)
    assert torch.allclose(c, torch.ones(4))  # mean 1 over the batch
    (c * torch.tensor([1.0, -1.0, -1.0, 2.0])).sum().backward()
    assert set(flat.grad.nonzero().flatten().tolist()) <= {1, 4, 7}
    with pytest.raises(ValueError, match="init_weight"):
        InstanceTable(["a"], size=3, activation="sigmoid", init_weight=1.5)


def _flipped(n=240, seed=0):
    """Two domains of 2-D points; in domain ``noisy`` half the labels are flipped (known rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    domain = torch.arange(n) % 2
    flipped = (domain == 1) & (torch.rand(n, generator=g) < 0.5)
    y = torch.where(flipped, 1 - y, y)
    features = torch.stack([flipped.float(), torch.rand(n, generator=g)], 1)  # a telling column
    xm = torch.randn(80, 2, generator=g)
    data = DomainData(
        ["clean", "noisy"],
        {"x": x, "y": y, "domain": domain, "features": features},
        {"x": xm, "y": (xm[:, 0] > 0).long()},
    )
    return data, flipped


def test_the_instance_table_learns_to_weigh_flipped_labels_down():
    data, flipped = _flipped()
    weights = InstanceTable(data.names, size=len(flipped))
    trainer = BilevelTrainer(
        torch.nn.Linear(2, 2),
        weights,
        build("first_order"),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=300, outer_every=1, batch_size=48, progress=False, inner_lr=0.5),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        outer_optimizer=lambda p: LazyAdam(p, lr=0.1),
    )
    trainer.fit()
    learned = weights.table()
    assert learned[flipped].mean() < learned[~flipped].mean() - 0.2, (
        learned[flipped].mean(),
        learned[~flipped].mean(),
    )
    assert trainer.data.train["row"].tolist() == list(range(len(flipped)))


def test_the_instance_net_reads_the_feature_column():
    data, flipped = _flipped()
    net = MetaWeightNet(data.names, hidden=16, features="features", feature_dim=2)
    trainer = BilevelTrainer(
        torch.nn.Linear(2, 2),
        net,
        build("first_order"),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=300, outer_every=1, batch_size=48, progress=False, inner_lr=0.5),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        outer_optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
    )
    trainer.fit()
    with torch.no_grad():
        v = net.raw(torch.zeros(len(flipped)), data.train["domain"], None, data.train["features"])
    # only ratios matter (c = V / mean V): flipped examples end far below the others
    assert v[flipped].mean() < 0.5 * v[~flipped].mean()


def test_instance_weights_from_the_command_line(run_cli, tmp_path):
    summary, _ = run_cli("experiment=tiny", "weights=instance_table")
    assert summary["parametrization"] == "instance_table" and summary["steps"] == 40
    with pytest.raises(ConfigError, match="weights.features: the training data has no float"):
        run_cli("experiment=tiny", "weights=instance_net", out=tmp_path / "net")
    with pytest.raises(ConfigError, match="weights.size: is 5"):
        BilevelTrainer(
            torch.nn.Linear(2, 2),
            InstanceTable(["clean", "noisy"], size=5),
            build("first_order"),
            per_example_cross_entropy,
            cross_entropy,
            _flipped()[0],
        )
