"""One meaning for inner_lr (the step the hypergradient assumes), and the schedule stepped once per
inner step in every path."""

import pytest
import torch

from bilevel import (
    TrainerConfig,
)
from bilevel.logging import read_jsonl
from bilevel.solvers import build
from tests.helpers import cli, cli_batch
from tests.trainer.helpers import scheduled, small_trainer


@pytest.mark.parametrize("solver", ["first_order", "unrolled", "cg"])
def test_the_scheduler_steps_once_per_inner_step_in_every_path(solver):
    trainer = scheduled(solver)
    trainer.fit()
    assert trainer.inner_opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.9**10)


@pytest.mark.parametrize(
    ("solver", "learn", "said"),
    [
        ("first_order", True, None),  # v = inner_lr grad M
        ("doge", True, None),  # eta = lr * inner_lr
        ("cg", True, "cg solves with the inner Hessian itself"),
        ("neumann", True, "neumann solves with the inner Hessian itself"),
        ("sama", True, "sama takes its step from the inner optimizer's own update"),
        ("unrolled", True, "unrolled differentiates the real SGD steps"),
        ("scalebio", True, "scalebio's penalty method assumes no inner step"),
        ("odm", True, "odm computes no hypergradient"),
        ("first_order", False, "trainer.learn_weights=false runs no outer step"),
    ],
)
def test_an_inner_lr_that_changes_nothing_is_a_note(solver, learn, said):
    """trainer.inner_lr is the step first_order assumes; the solvers that assume none
    ignored it without a word (only unrolled said so)."""
    config = TrainerConfig(steps=5, progress=False, inner_lr=0.3, learn_weights=learn)
    options = {"steps": 2} if solver == "unrolled" else {}
    notes = [
        n for n in small_trainer(config, solver=build(solver, **options)).notes if "inner_lr" in n
    ]
    if said is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith("trainer.inner_lr=0.3 has no effect: ")
        assert said in notes[0]


def test_the_cosine_preset_decays_over_the_run_and_is_not_extended_on_resume(tmp_path):
    out = tmp_path / "run"
    proc = cli("experiment=tiny", "trainer/inner_scheduler=cosine", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    lrs = [r["inner_lr"] for r in read_jsonl(out / "metrics.jsonl") if "inner_lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * lrs[0]  # to ~0 at step 40
    # T_max is ${trainer.steps}: past it the cosine would climb again, so no extension; the
    # explanation is the right one for other refusals: a seed is not the run's length, and
    # keys of a newly chosen group follow from the choice, not from an interpolation
    proc, seed, group, preset = cli_batch(
        [
            [f"resume={out}", "trainer.steps=80"],
            [f"resume={out}", "seed=5"],
            [f"resume={out}", "trainer/inner_scheduler=warmup"],
            [f"resume={out}", "experiment=digits"],
        ]
    )
    assert proc.returncode == 2
    assert "trainer.inner_scheduler.T_max follows from trainer.steps" in proc.stderr
    assert "tied to the run's length" in proc.stderr
    assert seed.returncode == 2 and "data.seed follows from seed" in seed.stderr
    assert "run's length" not in seed.stderr
    assert group.returncode == 2 and "trainer.inner_scheduler" in group.stderr
    assert "interpolation" not in group.stderr
    # an experiment preset sets data and model keys in its file, not through an interpolation
    assert preset.returncode == 2
    assert "follow from experiment, which sets them in its preset file" in preset.stderr
    assert "interpolation" not in preset.stderr


def test_inner_lr_never_changes_how_unrolled_trains():
    a, b = scheduled("unrolled"), scheduled("unrolled", inner_lr=0.05)
    assert b.notes and "has no effect: unrolled differentiates" in b.notes[0]
    sa, sb = a.fit(), b.fit()
    assert sa["weights"] == sb["weights"]
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(p, q)


def test_inner_lr_is_only_the_step_the_hypergradient_assumes():
    a, b = scheduled("first_order"), scheduled("first_order", inner_lr=0.05)
    a.config.learn_weights = b.config.learn_weights = False  # same training, if lr unused
    a.fit(), b.fit()
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(p, q)


def test_first_order_uses_the_lr_of_the_step_it_differentiates():
    # with a decaying lr, the kept-graph first_order gradient is -lr_t <grad L_k, grad M>,
    # lr_t the lr of the step actually taken (not the next step's)
    trainer = scheduled("first_order", steps=5)
    lrs = []
    original = trainer.method._solve

    def spy(loop, products, g):
        lrs.append(loop.hyper_lr())
        return original(loop, products, g)

    trainer.method._solve = spy
    trainer.step_window()
    assert lrs == [pytest.approx(0.2 * 0.9**4)]
