"""Non-finite values: skipped on the device, counted, and a run that keeps meeting them stops with
exit 3 after a checkpoint."""

import json

import pytest
import torch
import torch.nn.functional as F

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
)
from bilevel.data import noisy_domains
from bilevel.errors import ConfigError, NonFiniteError
from bilevel.logging import read_jsonl
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from tests.helpers import cli
from tests.trainer.helpers import make_trainer, small_trainer


def test_nan_in_the_meta_set_is_refused_at_start():
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8)
    data.meta["x"][3, 2] = torch.nan
    with pytest.raises(ConfigError, match="data.meta.*non-finite"):
        data.validate()


def nan_meta_trainer(tmp_path, steps=20, max_skipped=20):
    data = noisy_domains(per_domain=32, meta_size=8, test_size=8)
    model = MLP(**data.model_kwargs, hidden=8)

    def nan_outer(output, batch):
        return F.cross_entropy(output, batch["y"]) * torch.nan

    return BilevelTrainer(
        model,
        DomainWeights(data.names),
        build("first_order"),
        per_example_cross_entropy,
        nan_outer,
        data,
        TrainerConfig(
            steps=steps,
            outer_every=5,
            batch_size=16,
            progress=False,
            log_every=5,
            max_skipped=max_skipped,
        ),
        run_dir=tmp_path / "run",
    )


def test_a_run_whose_outer_updates_are_all_skipped_stops(tmp_path):
    # 4 outer updates, all skipped, fewer than max_skipped: the end of the run catches it
    trainer = nan_meta_trainer(tmp_path, steps=20, max_skipped=20)
    with pytest.raises(NonFiniteError, match="meta loss is not finite"):
        trainer.fit()
    assert trainer.loop.skips.totals()["skipped_inner"] == 0
    assert not (tmp_path / "run" / "summary.json").exists()


def test_consecutive_outer_skips_stop_even_while_inner_steps_succeed(tmp_path):
    trainer = nan_meta_trainer(tmp_path, steps=500, max_skipped=3)
    with pytest.raises(NonFiniteError, match="3 consecutive outer updates"):
        trainer.fit()
    assert trainer.step < 500


def test_nan_meta_loss_exits_3_from_the_cli(tmp_path):
    (tmp_path / "nanmeta.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "def loss(output, batch):\n"
        "    return F.cross_entropy(output, batch['y']) * torch.nan\n"
    )
    proc = cli(
        "experiment=tiny",
        "outer_loss._target_=nanmeta.loss",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "meta loss is not finite" in lines[0]


def test_data_with_nan_inputs_is_one_line(tmp_path):
    (tmp_path / "nandata.py").write_text(
        "import torch\n"
        "from bilevel.data import noisy_domains\n"
        "def build(**kw):\n"
        "    d = noisy_domains(**kw)\n"
        "    d.meta['x'][0, 0] = float('nan')\n"
        "    return d\n"
    )
    proc = cli(
        "experiment=tiny",
        "data._target_=nandata.build",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 2 and "bilevel: error: data.meta" in proc.stderr, proc.stderr


def test_a_hypergradient_whose_square_overflows_is_skipped_not_a_frozen_adam():
    """|dM/dw| ~ 1e30 (here from an absurd trainer.inner_lr; a diverging solver gives the
    same) is finite, so it was applied: Adam's second moment became inf, every step of the
    weights after it was exactly 0, and the run ended at its initial weights with exit 0."""
    config = TrainerConfig(steps=20, outer_every=5, inner_lr=1e30, progress=False)
    with pytest.raises(NonFiniteError, match="so large that its square overflows"):
        small_trainer(config).fit()


def test_a_diverging_neumann_series_stops_the_run_naming_solver_alpha():
    """alpha=100 on the default problem: the series diverged in every outer update and the
    weights moved at random (or, with Adam's second moment overflowed, not at all)."""
    config = TrainerConfig(steps=20, outer_every=5, progress=False)
    with pytest.raises(NonFiniteError, match=r"Neumann series diverged in \d+ of 4 .*solver.alpha"):
        small_trainer(config, solver=build("neumann", alpha=100.0)).fit()


@pytest.mark.parametrize(
    "opts",
    [
        {"iters": 1, "warm_start": True, "alpha": 0.1},
        {"iters": 1, "warm_start": True, "alpha": 0.1, "simultaneous": True},
    ],
)
def test_a_warm_neumann_run_outlives_one_non_finite_meta_loss(opts):
    """One window whose meta loss is NaN (a transient overflow) left NaN in the kept solution:
    every later hypergradient was NaN and skipped, so the weights froze and the run stopped
    after trainer.max_skipped windows. Now only that window's update is skipped."""
    poisoned = {"on": False}

    def outer(output, batch):
        value = cross_entropy(output, batch)
        return value * float("nan") if poisoned["on"] else value

    trainer = small_trainer(
        TrainerConfig(steps=200, progress=False),
        solver=build("neumann", **opts),
        outer_loss=outer,
    )
    for _ in range(5):
        trainer.step_window()
    poisoned["on"] = True
    trainer.step_window()
    poisoned["on"] = False
    before = trainer.weights.logits.detach().clone()
    for _ in range(5):
        trainer.step_window()
    assert trainer.loop.skips.totals()["skipped_outer"] == 1
    assert torch.isfinite(trainer.weights.logits).all()
    assert not torch.equal(trainer.weights.logits, before)  # the weights move again


class NaNForDomain:
    """Per-example cross-entropy, NaN for one domain's examples on chosen calls."""

    def __init__(self, domain, calls):
        self.domain, self.calls, self.n = domain, set(calls), 0

    def __call__(self, output, batch):
        self.n += 1
        loss = F.cross_entropy(output, batch["y"], reduction="none")
        if self.n in self.calls:
            loss = torch.where(batch["domain"] == self.domain, torch.nan, loss)
        return loss


def test_nan_in_one_domain_is_skipped_and_reported(tmp_path):
    # first_order takes its hypergradient from the last inner step's graph: the inner loss is
    # called once per inner step (after one call that checks its shape when the trainer is
    # built), so call 13 is the 2nd step of the 3rd window.
    trainer = make_trainer(NaNForDomain(domain=1, calls={13}), tmp_path)
    summary = trainer.fit()
    assert summary["steps"] == 40
    assert summary["skipped_inner"] == 1 and summary["skipped_outer"] == 0
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(list(summary["weights"].values()))))
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1


def test_nan_in_the_last_step_of_a_window_skips_it_and_the_outer_update(tmp_path):
    trainer = make_trainer(NaNForDomain(domain=3, calls={11}), tmp_path)
    summary = trainer.fit()
    assert summary["skipped_inner"] == 1 and summary["skipped_outer"] == 1


def test_skipped_inner_step_leaves_model_unchanged():
    trainer = make_trainer(NaNForDomain(domain=2, calls={2}))  # call 1 checks the shape
    before = [p.detach().clone() for p in trainer.module.parameters()]
    state = (
        {k: v.clone() for k, v in trainer.inner_opt.state_dict()["state"].items()}
        if trainer.inner_opt.state_dict()["state"]
        else {}
    )
    trainer.loop.inner_step(trainer.loop.next_batch())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))
    assert trainer.skips.inner.item() == 1 and state == {}
    trainer.loop.inner_step(trainer.loop.next_batch())  # call 3 is finite: it moves
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))


def test_non_finite_hypergradient_keeps_weights(tmp_path):
    calls = {"n": 0}

    def nan_meta(output, batch):
        calls["n"] += 1
        loss = F.cross_entropy(output, batch["y"])
        return loss * torch.nan if calls["n"] == 1 else loss

    trainer = make_trainer(per_example_cross_entropy, tmp_path, steps=5, log_every=5)
    trainer.outer_loss = nan_meta
    before = trainer.weights.logits.detach().clone()
    trainer._window(5)
    assert torch.equal(trainer.weights.logits.detach(), before)
    assert trainer.skips.outer.item() == 1


def test_too_many_consecutive_skips_stop_the_run_with_a_checkpoint(tmp_path):
    trainer = make_trainer(
        NaNForDomain(domain=0, calls=range(5, 10_000)), tmp_path, max_skipped=8, checkpoint_every=0
    )
    with pytest.raises(NonFiniteError, match="consecutive inner steps were skipped"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "summary.json").exists()


def test_nonfinite_stop_exits_3_with_message(tmp_path):
    (tmp_path / "nanloss.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "def loss(output, batch):\n"
        "    return F.cross_entropy(output, batch['y'], reduction='none') * torch.nan\n"
    )
    proc = cli(
        "experiment=tiny",
        "inner_loss._target_=nanloss.loss",
        "trainer.max_skipped=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 3, proc.stderr
    assert "consecutive inner steps were skipped" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
