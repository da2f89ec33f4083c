"""What a run leaves behind and what a sweep optimizes: a test set without ``evaluate``, a crash
in the user's own model, the sweep table, ``optimized_metric``, provenance, the seed reaching a
builder of one's own, ``weights.init=from:``, progress lines without a terminal, an API run's
``config.json``."""

import json

import pytest
import torch

import bilevel
from bilevel import BilevelTrainer, TrainerConfig
from bilevel.cli.build import check_target, init_from_run
from bilevel.cli.collect import write_tables
from bilevel.cli.failures import crash_hint, metric_of
from bilevel.data import DomainData
from bilevel.errors import ConfigError
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.solvers import build
from tests.helpers import cli, cli_batch, read_summary

USER_CODE = '''
import torch
from bilevel.data import DomainData


class Narrow(torch.nn.Module):
    """A model written for 5 input features (the data has 3)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.layer(x)


def make(rows=40, seed=0):
    """Two domains of 3 features; the seed draws other data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g)
    y = (x[:, 0] > 0).long()
    domain = torch.arange(rows) % 2
    return DomainData(
        names=["a", "b"],
        train={"x": x, "y": y, "domain": domain},
        meta={"x": x[:10], "y": y[:10]},
        test={"x": x[10:30], "y": y[10:30]},
        model_kwargs={"in_dim": 3, "out_dim": 2},
    )
'''


def _points(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > 0).long(), torch.arange(n) % 3


def _fit(data, model, tmp_path=None, **config):
    trainer = BilevelTrainer(
        model,
        bilevel.DomainWeights(data.names),
        build("first_order"),
        per_example_cross_entropy if data.train["y"].dtype == torch.int64 else _mse,
        cross_entropy if data.train["y"].dtype == torch.int64 else _mse_mean,
        data,
        TrainerConfig(steps=10, batch_size=30, progress=False, **config),
        run_dir=tmp_path,
    )
    return trainer.fit()


def _mse(output, batch):
    return ((output - batch["y"]) ** 2).mean(-1)


def _mse_mean(output, batch):
    return _mse(output, batch).mean()


def test_a_test_set_without_evaluate_is_scored_by_what_its_targets_are(tmp_path):
    x, y, domain = _points()
    data = DomainData(
        ["a", "b", "c"],
        {"x": x, "y": y, "domain": domain},
        {"x": x[:30], "y": y[:30]},
        test={"x": x[30:90], "y": y[30:90]},
    )
    summary = _fit(data, torch.nn.Linear(2, 2), tmp_path / "run")
    assert set(summary["test"]) == {"accuracy", "loss"} and 0 <= summary["test"]["accuracy"] <= 1
    assert any("classification_metrics" in n for n in summary["notes"])
    # float targets of the output's size: regression metrics
    target = x[:, :1] * 2.0
    data = DomainData(
        ["a", "b", "c"],
        {"x": x, "y": target, "domain": domain},
        {"x": x[:30], "y": target[:30]},
        test={"x": x[30:90], "y": target[30:90]},
    )
    summary = _fit(data, torch.nn.Linear(2, 1))
    assert {"mse", "mae"} <= set(summary["test"])
    # targets the library cannot read: a note says the set is not scored
    data = DomainData(
        ["a", "b", "c"],
        {"x": x, "y": y, "domain": domain},
        {"x": x[:30], "y": y[:30]},
        test={"x": x[30:90], "label": y[30:90]},
    )
    summary = _fit(data, torch.nn.Linear(2, 2))
    assert summary["test"] == {}
    assert any("it is not scored" in n for n in summary["notes"])


def test_settings_the_run_cannot_use_are_said():
    x, y, domain = _points()
    data = DomainData(["a", "b", "c"], {"x": x, "y": y, "domain": domain}, {"x": x, "y": y})
    summary = _fit(data, torch.nn.Linear(2, 2), eval_every=5, checkpoint_every=5)
    said = " ".join(summary["notes"])
    assert "trainer.eval_every=5 has no effect" in said
    assert "trainer.checkpoint_every=5 has no effect" in said


def test_an_api_run_records_its_config_and_provenance(tmp_path):
    x, y, domain = _points()
    data = DomainData(["a", "b", "c"], {"x": x, "y": y, "domain": domain}, {"x": x, "y": y})
    summary = _fit(data, torch.nn.Linear(2, 2), tmp_path / "run", outer_every=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["source"] == "python" and config["trainer"]["outer_every"] == 2
    assert config["solver"]["name"] == "first_order" and config["domains"] == ["a", "b", "c"]
    assert config["model"] == "torch.nn.modules.linear.Linear"
    made = summary["provenance"]
    assert made["bilevel"] and made["torch"] == torch.__version__
    assert made["threads"] == torch.get_num_threads() and made["device"] == "cpu"
    assert made["device_name"] and "command" in made and "git_commit" in made
    assert summary["status"] == "finished"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"] == made


def test_a_crash_in_the_users_model_leaves_its_story_in_the_run_folder(tmp_path):
    (tmp_path / "user_code.py").write_text(USER_CODE)
    small = ["trainer.steps=4", "trainer.batch_size=8", "trainer.log_every=2"]
    crash, seeded_0, seeded_1, preset = cli_batch(
        [
            [
                "data=custom",
                "data._target_=user_code.make",
                "model._target_=user_code.Narrow",
                "~model.hidden",
                "~model.activation",
                *small,
                f"hydra.run.dir={tmp_path / 'crash'}",
            ],
            *(
                [
                    "data=custom",
                    "data._target_=user_code.make",
                    f"seed={seed}",
                    *small,
                    f"hydra.run.dir={tmp_path / f'seed{seed}'}",
                ]
                for seed in (0, 1)
            ),
            # a preset that sets data keys of its own, with the user's builder
            ["experiment=tiny", "data=custom", "data._target_=user_code.make"],
        ],
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert preset.returncode == 2
    assert "experiment=tiny sets data.per_domain for its own data" in preset.stderr
    assert crash.returncode == 1, crash.stderr[-2000:]
    last = crash.stderr.strip().splitlines()[-1]
    assert "mat1 and mat2 shapes cannot be multiplied" in last
    assert "takes inputs of width 5 but gets 3 (the data's model_kwargs say in_dim=3)" in last
    run = tmp_path / "crash"
    log = (run / "cli.log").read_text()
    assert "Traceback" in log and "user_code.py" in log  # where in the user's code
    summary = read_summary(run)
    assert summary["status"] == "failed" and "mat1 and mat2" in summary["error"]
    assert "user_code.py" in summary["traceback"] and summary["provenance"]["torch"]
    # the seed reaches a builder that takes one: two seeds, two data sets
    assert seeded_0.returncode == 0 and seeded_1.returncode == 0, seeded_1.stderr[-2000:]
    first = read_summary(tmp_path / "seed0")["test"]
    second = read_summary(tmp_path / "seed1")["test"]
    assert first != second


def test_the_crash_hint_names_both_widths():
    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x20 and 16x4)")
    hint = crash_hint(err, {"model_kwargs": {"in_dim": 20, "out_dim": 4}})
    assert "width 16 but gets 20 (the data's model_kwargs say in_dim=20)" in hint
    assert crash_hint(ValueError("something else"), {}) == ""


def test_a_module_in_the_working_directory_gets_the_pythonpath_hint(tmp_path, monkeypatch):
    (tmp_path / "mine_not_on_path.py").write_text("def make():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run with PYTHONPATH=."):
        check_target("mine_not_on_path.make", "data")
    with pytest.raises(ConfigError) as err:
        check_target("nowhere_at_all.make", "data")
    assert "PYTHONPATH" not in str(err.value)


def _job(folder, overrides, summary, metric="meta_loss", direction=None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "config.yaml").write_text(f"optimized_metric: {metric}\n")
    if direction:
        (folder / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  sweeper:\n    direction: {direction}\n"
        )
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_sweep_table_has_a_column_per_swept_key_and_the_fixed_ones_once(tmp_path):
    import csv

    cases = [("0.1", "0"), ("0.1", "1"), ("0.3", "0"), ("0.3", "1")]
    for i, (lr, seed) in enumerate(cases):
        summary = {
            "solver": "cg",
            "meta_loss": 1.0 - i / 10,
            "test": {"accuracy": 0.5 + (i % 2) / 10},
            "val": {"accuracy": [0.6, 0.9, 0.7, 0.8][i]},
            "weights": {"a": 0.5, "b": 0.5},
            "steps": 10,
        }
        overrides = ["experiment=tiny", f"trainer.inner_optimizer.lr={lr}", f"seed={seed}"]
        _job(tmp_path / str(i), overrides, summary, "val.accuracy")
    write_tables(tmp_path)
    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["job", "trainer.inner_optimizer.lr", "seed", "status"]
    assert "overrides" not in rows[0] and "experiment" not in rows[0]
    assert [r["seed"] for r in rows] == ["0", "1", "0", "1"]
    assert [r["best"] for r in rows] == ["", "*", "", ""]  # highest val accuracy: job 1
    md = (tmp_path / "results.md").read_text()
    assert "Every job: `experiment=tiny`" in md and "Solver: cg" in md
    assert "Optimized metric: `val.accuracy` (highest is best" in md
    assert md.count("experiment=tiny") == 1


def test_an_optuna_table_marks_its_best_trial_by_the_sweepers_direction(tmp_path):
    for i, value in enumerate([0.3, 0.1, 0.2]):
        _job(
            tmp_path / str(i),
            ["hparams_search=optuna", f"trainer.outer_every={i + 1}"],
            {"meta_loss": 1.0, "val": {"loss": value}},
            "val.loss",
            "minimize",
        )
    write_tables(tmp_path)
    md = (tmp_path / "results.md").read_text()
    rows = [
        line.split(" | ") for line in md.splitlines() if line.startswith("| ") and "---" not in line
    ]
    head, body = rows[0], rows[1:]
    values = [r[head.index("trial_value")] for r in body]
    assert values == ["0.3000", "0.1000", "0.2000"]
    assert [r[-1].strip(" |") for r in body] == ["", "*", ""]


@pytest.mark.slow
def test_an_optuna_sweep_optimizes_the_chosen_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the [optuna] extra")
    sweep = tmp_path / "opt"
    proc = cli(
        "hparams_search=optuna",
        "experiment=tiny",
        "trainer.steps=10",
        "hydra.sweeper.n_trials=2",
        "optimized_metric=val.loss",
        "data.val_size=64",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    val_losses = [read_summary(p.parent)["val"]["loss"] for p in sweep.glob("*/summary.json")]
    meta_losses = [read_summary(p.parent)["meta_loss"] for p in sweep.glob("*/summary.json")]
    assert best == pytest.approx(min(val_losses)) and best not in meta_losses


def test_metric_of_reads_dotted_paths():
    summary = {"meta_loss": 0.5, "test": {"accuracy": 0.9}, "notes": ["x"]}
    assert metric_of(summary, "meta_loss") == 0.5 and metric_of(summary, "test.accuracy") == 0.9
    assert metric_of(summary, "val.loss") is None and metric_of(summary, "notes") is None


def test_weights_init_from_a_run(run_cli, tmp_path):
    summary, proxy = run_cli("experiment=tiny", "trainer.steps=20", out=tmp_path / "proxy")
    names = list(summary["weights"])
    final = init_from_run(f"from:{proxy}", names)
    assert final == pytest.approx([summary["weights"][n] for n in names])
    logged = [
        json.loads(line)["weights"]
        for line in (proxy / "metrics.jsonl").read_text().splitlines()
        if '"weights"' in line and json.loads(line).get("step", 0) > 0
    ]
    mean = init_from_run(f"from:{proxy}:mean", names)
    assert mean == pytest.approx([sum(w[n] for w in logged) / len(logged) for n in names])
    # the bigger run on the learned mixture, weights held
    big, _ = run_cli(
        "experiment=tiny",
        f"weights.init=from:{proxy}",
        "trainer.learn_weights=false",
        "trainer.sampling=weights",
        out=tmp_path / "final",
    )
    assert big["weights"] == pytest.approx(summary["weights"], abs=1e-6)
    with pytest.raises(ConfigError, match="no such run directory"):
        init_from_run(f"from:{tmp_path / 'nowhere'}", names)
    with pytest.raises(ConfigError, match="domains"):
        init_from_run(f"from:{proxy}", ["x", "y"])


def test_progress_without_a_terminal_is_one_line_per_log_event(tmp_path, capsys):
    from bilevel.logging import RunLog

    log = RunLog(tmp_path / "run", progress=True, total=30)
    assert log.bar is None and log.lines  # pytest's captured stderr is not a terminal
    for step in (10, 20, 30):
        log.advance(10)
        log.show(step=step, meta=0.5)
    log.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"bilevel: step {s}/30: meta 0.5000" for s in (10, 20, 30)]


def test_tensorboard_and_mlflow_write_offline_into_the_run_directory(run_cli, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the [loggers] extra")
    pytest.importorskip("mlflow", reason="needs the [loggers] extra")
    summary, run = run_cli("experiment=tiny", "logger=[tensorboard,mlflow]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"meta_loss", "weights/d0", "test/accuracy"} <= set(tags)
    assert events.Scalars("weights/d0")[-1].value == pytest.approx(summary["weights"]["d0"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("bilevel").experiment_id])
    history = client.get_metric_history(found.info.run_id, "meta_loss")
    assert [m.step for m in history] == [0, 10, 20, 30, 40]  # step 0: before training
    assert found.data.params["trainer.steps"] == "40"
    assert found.data.metrics["final/test/accuracy"] == pytest.approx(summary["test"]["accuracy"])
