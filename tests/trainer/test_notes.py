"""What a run says in its first lines and at its end: settings that run but deserve a word."""

import dataclasses
import functools
import json

import pytest
import torch

from bilevel import (
    TrainerConfig,
)
from bilevel.data import noisy_domains
from bilevel.logging import read_jsonl
from bilevel.models import MLP
from bilevel.solvers import build
from tests.helpers import cli
from tests.trainer.helpers import scheduled, small_trainer


def test_batch_smaller_than_k_learns_every_domain_and_says_so(run_cli):
    summary, out = run_cli("experiment=tiny", "trainer.batch_size=2", "trainer.steps=200")
    weights = summary["weights"]
    assert all(abs(v - 0.25) > 1e-4 for v in weights.values()), weights  # every one moved
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "domain_loss" in r]
    seen = {n for r in records for n, v in r["domain_loss"].items() if v > 0}
    assert seen == set(weights)


def test_batch_smaller_than_k_note_in_the_first_lines(tmp_path):
    proc = cli("experiment=tiny", "trainer.batch_size=2", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[:3]
    assert any("trainer.batch_size=2" in line and "fewer than one row" in line for line in first)


def test_summary_records_the_strategy_and_parameter_counts(run_cli):
    summary, out = run_cli("experiment=tiny")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["strategy"] == "ddp" and on_disk["world_size"] == 1
    assert on_disk["parameter_elements"] == on_disk["parameter_elements_per_rank"] > 0


def test_sama_with_an_optimizer_it_cannot_precondition_says_so(tmp_path):
    proc = cli(
        "experiment=tiny",
        "solver=sama",
        "trainer/inner_optimizer=rmsprop",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[:3]
    assert any("sama cannot precondition RMSprop" in line for line in first)


def test_a_run_shorter_than_one_window_says_that_no_outer_step_runs():
    trainer = small_trainer(TrainerConfig(steps=4, outer_every=5, batch_size=16, progress=False))
    assert any("no outer step runs" in note for note in trainer.notes)
    summary = trainer.fit()
    assert summary["outer_updates"] == 0
    assert all(abs(v - 0.25) < 1e-7 for v in summary["weights"].values())
    trainer = small_trainer(TrainerConfig(steps=10, outer_every=5, batch_size=16, progress=False))
    assert not any("no outer step runs" in note for note in trainer.notes)
    assert trainer.fit()["outer_updates"] == 2


def test_one_domain_on_the_simplex_says_that_nothing_is_learned():
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0).subset(["d0"])
    config = TrainerConfig(steps=5, batch_size=16, progress=False)
    assert any("nothing is learned" in n for n in small_trainer(config, data=data).notes)
    assert not any("nothing is learned" in n for n in small_trainer(config).notes)
    # its zero hypergradient is explained once: the end of the run adds no second note
    # blaming the meta set
    summary = small_trainer(TrainerConfig(steps=10, outer_every=5, progress=False), data=data).fit()
    assert len([n for n in summary["notes"] if "nothing is learned" in n]) == 1
    assert not any("exactly zero" in n for n in summary["notes"])


def test_a_meta_batch_larger_than_the_meta_set_is_named_in_the_notes():
    def notes(meta_batch_size):
        config = TrainerConfig(steps=5, batch_size=16, meta_batch_size=meta_batch_size)
        return small_trainer(config).notes

    assert any("larger than the meta set (16 rows)" in n for n in notes(64))
    assert not any("meta set" in n for n in notes(8) + notes(None))
    # the same for the training batch, whether or not the weights are learned
    for learn in (True, False):
        config = TrainerConfig(steps=5, batch_size=200, learn_weights=learn)
        big = small_trainer(config).notes
        assert any("larger than the training set (128 rows)" in n for n in big), big
    assert not any("training set" in n for n in notes(8))


@pytest.mark.parametrize("solver", ["odm", "scalebio", "doge"])
def test_fixed_weights_with_a_method_of_its_own_runs_plain_steps_and_says_so(solver):
    """learn_weights=false is the fixed-weight baseline whatever the solver: a method that
    moves the weights by its own rule (and keeps state for it) is not run, and the run says so
    in its first lines, instead of failing inside the method at its first window."""
    trainer = small_trainer(
        TrainerConfig(steps=10, outer_every=5, learn_weights=False, progress=False),
        solver=build(solver),
    )
    assert any(f"solver={solver} does not run" in note for note in trainer.notes)
    before = trainer.weights.value().clone()
    summary = trainer.fit()
    assert torch.equal(trainer.weights.value(), before) and summary["skipped_steps"] == 0


def test_an_option_without_effect_on_the_solver_is_a_note():
    trainer = small_trainer(
        TrainerConfig(steps=10, hessian_batch="independent", progress=False),
        solver=build("unrolled", steps=2),
    )
    assert any("hessian_batch=independent has no effect on unrolled" in n for n in trainer.notes)
    cg = small_trainer(
        TrainerConfig(steps=10, hessian_batch="independent", progress=False), solver=build("cg")
    )
    assert not any("hessian_batch" in n for n in cg.notes)
    for config, solver, noted in [
        (TrainerConfig(temperature=2.0), "first_order", "temperature=2.0 has no effect"),
        (TrainerConfig(meta_batch_size=8), "odm", "odm does not read the meta set"),
        (TrainerConfig(meta_batch_size=8, learn_weights=False), "first_order", "runs no outer"),
    ]:
        notes = small_trainer(config, solver=build(solver)).notes
        assert any(noted in n for n in notes), notes
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    for part in (data.train, data.meta, data.test):
        part["x"] = part["x"].double()
    model = MLP(**data.model_kwargs, hidden=8).double()
    f64 = small_trainer(TrainerConfig(precision="bf16"), model=model, data=data)
    assert any("precision=bf16 has no effect on a float64 model" in n for n in f64.notes)
    quiet = small_trainer(
        TrainerConfig(
            meta_batch_size=8,
            sampling="temperature",
            temperature=2.0,
            learn_weights=False,
            progress=False,
        )
    ).notes
    assert not any("temperature" in n for n in quiet)
    assert not any(
        "meta_batch_size" in n for n in small_trainer(TrainerConfig(meta_batch_size=8)).notes
    )


def test_a_solvers_own_notes_end_the_run():
    """A solver with ``notes()`` (any user solver too) is read once at the end: its notes
    are logged and land in the summary's ``notes``."""

    @dataclasses.dataclass(frozen=True)
    class Noting(type(build("first_order"))):
        def notes(self):
            return ["my solver has something to say"]

    summary = small_trainer(
        TrainerConfig(steps=10, outer_every=5, progress=False), solver=Noting()
    ).fit()
    assert summary["notes"][-1] == "my solver has something to say"


def test_an_outer_optimizer_for_a_method_with_its_own_rule_is_a_note():
    """DoGE and ODM set the weights themselves and loss-based reweighting keeps them: an outer
    optimizer chosen for them (in Python, or on the command line, not by the default config)
    would change nothing, silently."""
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    config = TrainerConfig(steps=10, progress=False)
    for solver, rule in [
        ("doge", "by its own rule"),
        ("odm", "by its own rule"),
        ("loss_reweighting", "does not move the domain weights"),
    ]:
        trainer = small_trainer(config, solver=build(solver), outer_optimizer=sgd)
        assert any(
            f"outer_optimizer has no effect on solver={solver}: it " in n and rule in n
            for n in trainer.notes
        ), trainer.notes
        assert not any(
            "outer_optimizer" in n for n in small_trainer(config, solver=build(solver)).notes
        )
    assert not any("outer_optimizer" in n for n in small_trainer(config, outer_optimizer=sgd).notes)
    for overrides, noted in [(["trainer/outer_optimizer=sgd"], True), (["seed=1"], False)]:
        trainer = small_trainer(
            config, build("doge"), outer_optimizer=sgd, run_config={"seed": 1}, overrides=overrides
        )
        assert any("outer_optimizer" in n for n in trainer.notes) is noted


@pytest.mark.parametrize("solver", ["first_order", "cg"])
def test_a_run_whose_weights_never_moved_says_why(solver, caplog):
    def flat(output, batch):  # differentiable, but the same value whatever the model does
        return (output * 0).sum()

    trainer = scheduled(solver)
    trainer.outer_loss = flat
    with caplog.at_level("WARNING", logger="bilevel"):
        summary = trainer.fit()
    assert set(summary["weights"].values()) == {0.25}
    said = [n for n in summary["notes"] if "hypergradient was exactly zero" in n]
    assert len(said) == 1 and "in all 2 outer updates" in said[0]
    assert said[0] in caplog.text
    # a meta loss that moves the weights says nothing of the kind
    summary = scheduled(solver).fit()
    assert not any("exactly zero" in n for n in summary["notes"])


def test_a_presets_value_that_changes_nothing_is_no_note():
    """trainer.inner_lr, meta_batch_size, temperature and hessian_batch that change nothing
    are noted when the user set them (in Python; on the command line, an override naming
    them), not when an experiment preset set them for its own method: every uniform run of
    the prm study said 'trainer.inner_lr=0.1 has no effect'."""
    config = TrainerConfig(
        steps=10,
        progress=False,
        learn_weights=False,
        inner_lr=0.1,
        meta_batch_size=8,
        temperature=2.0,
        hessian_batch="independent",
    )
    keys = ("inner_lr", "meta_batch_size", "temperature", "hessian_batch")

    def noted(**kwargs):
        notes = small_trainer(config, **kwargs).notes
        return {k for k in keys if any(n.startswith(f"trainer.{k}=") for n in notes)}

    assert noted() == set(keys)  # Python: set by hand
    assert noted(run_config={"seed": 0}, overrides=["experiment=prm"]) == set()
    cli_set = ["trainer.inner_lr=0.1", "+trainer.temperature=2.0"]
    assert noted(run_config={"seed": 0}, overrides=cli_set) == {"inner_lr", "temperature"}
