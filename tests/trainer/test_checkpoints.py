"""What a checkpoint holds, when it is written, and one line for one that cannot be read or does
not fit."""

import pytest
import torch
from torch import nn

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
)
from bilevel.data import noisy_domains
from bilevel.errors import ConfigError
from bilevel.logging import read_jsonl
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from tests.helpers import cli, read_summary
from tests.trainer.helpers import small_trainer


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "pickle"])
def test_unreadable_checkpoint_is_one_line(tmp_path, finished, kind):
    file = tmp_path / "bad.pt"
    raw = (finished / "checkpoints" / "last.pt").read_bytes()
    content = {
        "empty": b"",
        "truncated": raw[: len(raw) // 3],
        "random": bytes(range(256)) * 40,
        "pickle": __import__("pickle").dumps({"step": 3, "evil": object}),
    }[kind]
    file.write_bytes(content)
    proc = cli("experiment=tiny", f"resume={file}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bilevel: error: resume:"), proc.stderr
    assert not (tmp_path / "r").exists()


def test_checkpoint_of_another_model_shape_is_one_line(finished):
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64)
    trainer = BilevelTrainer(
        MLP(**data.model_kwargs, hidden=32),
        DomainWeights(data.names),
        build("first_order"),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=80, progress=False),
    )
    with pytest.raises(ConfigError, match="resume: the checkpoint's model .* does not fit"):
        trainer.resume(finished)


def test_resuming_a_finished_run_says_how_to_continue(tmp_path, finished):
    import shutil

    run = shutil.copytree(finished, tmp_path / "run")  # the fixture stays as it is
    before = (run / "metrics.jsonl").read_text()
    proc = cli(f"resume={run}")
    assert proc.returncode == 0, proc.stderr
    assert "nothing left to train; raise trainer.steps" in proc.stdout + proc.stderr
    assert (run / "metrics.jsonl").read_text() == before  # no second test record
    proc = cli(f"resume={run}", "trainer.steps=60")
    assert proc.returncode == 0 and "nothing left" not in proc.stdout + proc.stderr
    assert read_summary(run)["steps"] == 60


def test_checkpoint_is_written_in_the_first_window(tmp_path):
    from bilevel.strategies import checkpoint

    data = noisy_domains(per_domain=64, meta_size=32, test_size=64)
    trainer = small_trainer(
        TrainerConfig(steps=10_000, outer_every=5, checkpoint_every=1000, progress=False),
        data=data,
        run_dir=tmp_path / "run",
    )
    trainer.step_window = _stop_after(trainer.step_window, 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 5


def test_a_final_evaluation_that_fails_costs_no_training(tmp_path):
    """The last checkpoint is written before the test set is evaluated: a bug in the user's
    evaluate (or memory on a large test set) is fixed and `resume` evaluates again."""
    from bilevel.logging import read_jsonl
    from bilevel.strategies import checkpoint

    data = noisy_domains(per_domain=64, meta_size=32, test_size=64)
    evaluate, broken = data.evaluate, {"on": True}

    def flaky(model, columns, device):
        if broken["on"]:
            raise RuntimeError("a bug in my evaluate")
        return evaluate(model, columns, device)

    data.evaluate = flaky

    def trainer():
        config = TrainerConfig(steps=20, outer_every=5, checkpoint_every=1000, progress=False)
        return small_trainer(config, data=data, run_dir=tmp_path / "run")

    with pytest.raises(RuntimeError, match="a bug in my evaluate"):
        trainer().fit()
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 20
    broken["on"] = False
    again = trainer()
    again.resume(tmp_path / "run")
    summary = again.fit()
    assert summary["steps"] == 20 and summary["test"]
    tests = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "test" in r]
    assert [r["step"] for r in tests] == [20]  # one test record, written by the resumed run


def _stop_after(fn, n):
    calls = {"n": 0}

    def wrapped():
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        fn()

    return wrapped


def test_checkpoints_hold_the_trainable_part_and_a_base_fingerprint(tmp_path):
    from bilevel.strategies import checkpoint

    class Frozen(nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.base = nn.Linear(16, 64)
            self.base.weight.data *= scale
            self.base.requires_grad_(False)
            self.head = nn.Linear(64, 4)

        def forward(self, x):
            return self.head(torch.relu(self.base(x)))

    data = noisy_domains(per_domain=64, meta_size=32, test_size=64)

    def trainer(model, run_dir):
        config = TrainerConfig(steps=10, progress=False)
        return small_trainer(config, data=data, run_dir=run_dir, model=model)

    torch.manual_seed(0)
    trainer(Frozen(), tmp_path / "a").fit()
    state = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    assert set(state["model"]) == {"head.weight", "head.bias"}
    assert state["frozen"]["fingerprint"] and state["frozen"]["parameters"] == 2
    torch.manual_seed(0)
    same = trainer(Frozen(), None)
    same.config.steps = 20
    same.resume(tmp_path / "a")
    assert same.step == 10
    torch.manual_seed(0)
    other = trainer(Frozen(scale=2.0), None)
    other.config.steps = 20
    with pytest.raises(ConfigError, match="another frozen base"):
        other.resume(tmp_path / "a")


def test_a_doremi_reference_of_another_model_is_one_line_before_training(finished):
    from bilevel_experiments.lm_mixture.doremi import DoReMi

    data = noisy_domains(per_domain=64, meta_size=32, test_size=64)
    with pytest.raises(ConfigError, match=r"solver.reference: .* is a run of another model"):
        BilevelTrainer(
            MLP(**data.model_kwargs, hidden=32),
            DomainWeights(data.names),
            DoReMi(reference=str(finished)),
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(steps=10, progress=False),
        )


def test_a_second_fit_continues_in_the_trainers_own_run_directory(tmp_path):
    """fit() again on the same trainer (a notebook: train, look, train on) was refused as a
    new run over an earlier one, with the command line's resume= as the advice. It now
    continues in its own folder: with more steps it ends bit-identical to one longer run."""
    torch.manual_seed(0)
    trainer = small_trainer(TrainerConfig(steps=10, progress=False), run_dir=tmp_path / "a")
    trainer.fit()
    assert trainer.fit()["steps"] == 10  # nothing left to train: the same summary
    trainer.config.steps = 20
    continued = trainer.fit()
    torch.manual_seed(0)
    straight = small_trainer(TrainerConfig(steps=20, progress=False), run_dir=tmp_path / "b")
    assert continued["weights"] == straight.fit()["weights"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "test" not in r]
    assert steps == sorted(steps) and steps[-1] == 20
    assert read_summary(tmp_path / "a")["steps"] == 20
    # another trainer pointed at that folder is a new run: refused, with the API's advice
    other = small_trainer(TrainerConfig(steps=10, progress=False), run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"continue it with BilevelTrainer.resume\("):
        other.fit()
