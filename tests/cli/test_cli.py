"""End-to-end runs of the Hydra app on tiny configs."""

import json

import pytest
import torch

from bilevel.cli import format_summary
from bilevel.errors import ConfigError
from bilevel.logging import read_jsonl
from bilevel.strategies import checkpoint
from tests.helpers import REPO, cli, cli_batch, read_summary


def test_tiny_run_writes_the_run_directory(run_cli):
    summary, out = run_cli("experiment=tiny")
    assert set(summary["weights"]) == {"d0", "d1", "d2", "d3"}
    assert {"weights", "meta_loss", "test", "steps", "wall_time_s", "solver"} <= set(summary)
    assert summary["steps"] == 40 and summary["solver"] == "first_order"
    assert set(summary["test"]) == {"accuracy", "loss"}
    on_disk = read_summary(out)
    assert on_disk["weights"] == pytest.approx(summary["weights"])
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "weights" in r] == [0, 10, 20, 30, 40]
    assert set(records[0]) == {"step", "weights", "meta_loss"}  # the starting point
    for r in records[1:]:
        if "weights" in r:
            assert {"inner_loss", "meta_loss", "weights", "step"} <= set(r)
    assert (out / "weights.png").stat().st_size > 1000
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["step"] == 40 and state["names"] == ["d0", "d1", "d2", "d3"]


@pytest.mark.parametrize("solver", ["first_order", "unrolled", "neumann", "cg"])
def test_every_solver_runs_in_the_trainer(run_cli, solver):
    summary, _ = run_cli("experiment=tiny", f"solver={solver}")
    assert summary["solver"] == solver
    assert all(torch.isfinite(torch.tensor(list(summary["weights"].values()))))
    assert summary["skipped_steps"] == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["weights.parametrization=exp", "trainer.outer_optimizer.lr=0.01"],
        ["weights.parametrization=sigmoid"],
        ["weights.parametrization=softplus"],
        ["trainer/outer_optimizer=mirror_descent", "trainer.outer_optimizer.smoothing=0.1"],
        ["trainer.sampling=weights"],
        ["trainer.sampling=size"],
        ["trainer/inner_optimizer=adam", "solver=cg"],
        ["trainer.meta_batch_size=8"],
        ["trainer.learn_weights=false"],
        ["trainer.precision=bf16"],
    ],
)
def test_options_run(run_cli, overrides):
    summary, _ = run_cli("experiment=tiny", *overrides)
    assert summary["steps"] == 40


def test_fixed_weights_stay_at_init(run_cli):
    summary, _ = run_cli(
        "experiment=tiny", "trainer.learn_weights=false", "weights.init=[0.1,0.2,0.3,0.4]"
    )
    assert list(summary["weights"].values()) == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "noise,seed",
    [
        ([0.0, 0.0, 0.4, 0.4], 0),
        ([0.4, 0.0, 0.0, 0.4], 1),
        ([0.0, 0.5, 0.0, 0.0], 2),
        ([0.3, 0.3, 0.3, 0.0], 3),
    ],
)
def test_noisy_domains_end_below_clean_ones(run_cli, noise, seed):
    summary, _ = run_cli(
        "experiment=noisy_domains",
        f"data.label_noise={noise}",
        f"seed={seed}",
        "trainer.steps=1500",
        "data.per_domain=1000",
    )
    w = summary["weights"]
    noisy = [w[f"d{i}"] for i, r in enumerate(noise) if r > 0]
    clean = [w[f"d{i}"] for i, r in enumerate(noise) if r == 0]
    assert max(noisy) < min(clean), w


def test_custom_outer_loss_from_outside_the_project(run_cli, tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg" / "my_losses"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch.nn.functional as F\n"
        "calls = []\n"
        "def smoothed(output, batch):\n"
        "    calls.append(output.shape[0])\n"
        "    return F.cross_entropy(output, batch['y'], label_smoothing=0.1)\n"
        "def per_example_hinge(output, batch):\n"
        "    calls.append(-1)\n"
        "    import torch\n"
        "    true = output.gather(1, batch['y'][:, None])\n"
        "    return (1 + output - true).clamp_min(0).sum(1) - 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "userpkg"))
    import my_losses

    summary, _ = run_cli("experiment=tiny", "outer_loss._target_=my_losses.smoothed")
    assert summary["steps"] == 40 and any(c > 0 for c in my_losses.calls)
    my_losses.calls.clear()
    run_cli(
        "experiment=tiny", "inner_loss._target_=my_losses.per_example_hinge", out=tmp_path / "2"
    )
    assert -1 in my_losses.calls


def test_custom_outer_loss_by_subprocess(tmp_path):
    pkg = tmp_path / "ext" / "extloss.py"
    pkg.parent.mkdir()
    pkg.write_text(
        "import torch.nn.functional as F\n"
        "def loss(output, batch):\n"
        "    print('EXTERNAL LOSS CALLED', flush=True)\n"
        "    return F.cross_entropy(output, batch['y'])\n"
    )
    out = tmp_path / "run"
    proc = cli(
        "experiment=tiny",
        "outer_loss._target_=extloss.loss",
        f"hydra.run.dir={out}",
        env={"PYTHONPATH": str(pkg.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "EXTERNAL LOSS CALLED" in proc.stdout
    assert read_summary(out)["steps"] == 40


USER_DATA = """
import torch
from bilevel.data import DomainData

def make(rows=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, generator=g)
    y = (x[:, 0] > 0).long()
    domain = torch.arange(rows) % 3
    y[domain == 2] = torch.randint(0, 2, (int((domain == 2).sum()),), generator=g)
    meta = {"x": x[:60], "y": (x[:60, 0] > 0).long()}
    names = ["a", "b", "noisy"]
    columns = {"x": x, "y": y, "domain": domain}
    return DomainData(names, columns, meta, model_kwargs={"in_dim": 2, "out_dim": 2})
"""

USER_MODEL = """
import torch

class Net(torch.nn.Sequential):
    def __init__(self, in_dim, out_dim, width=32):
        layers = [torch.nn.Linear(in_dim, width), torch.nn.ReLU()]
        super().__init__(*layers, torch.nn.Linear(width, out_dim))
"""


def test_your_own_data_and_model_from_the_command_line(tmp_path):
    """data=custom and model=custom start from empty presets: only the user's arguments (and
    the sizes the data announces) reach the user's functions; without them, the preset's keys
    do, and the error line says how to start from the empty preset."""
    pkg = tmp_path / "src" / "my_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text(USER_DATA)
    (pkg / "models.py").write_text(USER_MODEL)
    env = {"PYTHONPATH": str(pkg.parent)}
    out = tmp_path / "run"
    proc = cli(
        "data=custom",
        "data._target_=my_pkg.data.make",
        "+data.rows=240",
        "model=custom",
        "model._target_=my_pkg.models.Net",
        "+model.width=8",
        "trainer.steps=20",
        f"hydra.run.dir={out}",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(read_summary(out)["weights"]) == ["a", "b", "noisy"]
    proc = cli("data._target_=my_pkg.data.make", f"hydra.run.dir={tmp_path / 'r2'}", env=env)
    assert proc.returncode == 2
    assert "start from the empty one, data=custom data._target_=my_pkg.data.make" in proc.stderr


@pytest.mark.slow
def test_sweep_writes_one_summary_per_job(tmp_path):
    proc = cli(
        "-m",
        "experiment=tiny",
        "solver=first_order,cg",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 4
    solvers = sorted(json.loads(p.read_text())["solver"] for p in summaries)
    assert solvers == ["cg", "cg", "first_order", "first_order"]


def test_a_sweep_folder_with_foreign_files_is_refused_and_foreign_tables_are_kept(tmp_path):
    from bilevel.cli.collect import main as collect_main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("mine\n")
    proc = cli("-m", "experiment=tiny", "seed=0,1", f"hydra.sweep.dir={foreign}")
    assert proc.returncode == 2 and "bilevel: error: sweep directory" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["results.csv"]  # nothing written
    # a sweep of ours, whose results.md the user then replaced: rebuilding keeps the user's file
    ours = tmp_path / "ours"
    # -m after an override (Hydra's parser alone said "unrecognized arguments")
    assert cli("experiment=tiny", "-m", "seed=0", f"hydra.sweep.dir={ours}").returncode == 0
    assert (ours / "results.csv").read_text().startswith("job,")
    (ours / "results.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as stop:
        collect_main([str(ours)])
    assert stop.value.code == 2 and (ours / "results.md").read_text() == "my notes\n"


def test_a_bad_job_does_not_stop_the_sweep_and_its_row_says_why(tmp_path):
    import csv
    import shutil

    sweep = tmp_path / "sweep"
    proc = cli("-m", "experiment=tiny", "trainer.inner_lr=-1,0.1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bilevel: error: trainer.inner_lr: must be" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("bilevel: 1 sweep job failed")
    assert "Traceback" not in proc.stderr
    with (sweep / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["bad input", "ok"]  # the job after it still ran
    assert rows[0]["error"].startswith("trainer.inner_lr: must be") and not rows[1]["error"]
    assert rows[1]["meta_loss"] and (sweep / "1" / "summary.json").is_file()
    # the failed job's folder holds Hydra's files and the note only: it does not stand in the
    # way of a rerun (the job that ran does: a sweep never overwrites an earlier sweep's runs)
    rerun = ["-m", "experiment=tiny", "seed=0", f"hydra.sweep.dir={sweep}"]
    assert "job 1" in cli(*rerun).stderr
    shutil.rmtree(sweep / "1")
    assert cli(*rerun).returncode == 0


@pytest.mark.slow
def test_an_optuna_sweep_whose_trials_all_fail_ends_in_one_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the [optuna] extra")
    proc = cli(
        "hparams_search=optuna",
        "experiment=tiny",
        "hydra.sweeper.n_trials=2",
        "trainer.inner_lr=choice(-1,-2)",
        f"hydra.sweep.dir={tmp_path / 'opt'}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bilevel: every trial of the sweep failed (2;")


def test_wandb_offline_logs_weights(tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "experiment=tiny", "logger=wandb", f"hydra.run.dir={out}", env={"WANDB_SILENT": "false"}
    )
    assert proc.returncode == 0, proc.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    printed = proc.stdout + proc.stderr
    assert "saved locally" in printed  # where the run is, for wandb sync
    assert "Run history" not in printed and "Run summary" not in printed  # no 30-line dump


def test_unknown_group_option_lists_choices(tmp_path):
    proc = cli("experiment=tiny", "solver=newton", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("bilevel: error: solver: unknown option 'newton'; valid: cg, ")
    for name in ("doremi", "first_order", "neumann", "odm", "sama", "scalebio", "unrolled"):
        assert name in line


@pytest.mark.slow
def test_optuna_sweep_minimizes_meta_loss(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the [optuna] extra")
    proc = cli(
        "hparams_search=optuna",
        "experiment=tiny",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'opt'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "opt" / "optimization_results.yaml").exists()
    assert len(list((tmp_path / "opt").glob("*/summary.json"))) == 2


def test_a_new_run_never_overwrites_an_earlier_run_or_sweep(run_cli, tmp_path):
    """A second run (or sweep) pointed at the folder of an earlier one used to overwrite its
    checkpoint, metrics and summary, and Hydra its saved config, silently. Now refused in one
    line, before anything is written; resume= may still continue the run in its folder."""
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    first = cli_batch(
        [
            ["experiment=tiny", f"hydra.run.dir={run}"],
            ["-m", "experiment=tiny", "seed=0", f"hydra.sweep.dir={sweep}"],
        ]
    )
    assert [proc.returncode for proc in first] == [0, 0], first[1].stderr
    config = (run / ".hydra" / "config.yaml").read_bytes()
    swept = (sweep / "0" / "summary.json").read_bytes()
    with pytest.raises(ConfigError, match="holds an earlier run"):
        run_cli("experiment=tiny", "seed=1", out=run)  # the Python entry (BilevelTrainer.fit)
    new_run, new_sweep, resumed = cli_batch(
        [
            ["experiment=tiny", "seed=1", f"hydra.run.dir={run}"],
            ["-m", "experiment=tiny", "seed=1", f"hydra.sweep.dir={sweep}"],
            [f"resume={run}", f"hydra.run.dir={run}", "trainer.steps=60"],
        ]
    )
    assert new_run.returncode == 2 and "holds an earlier run" in new_run.stderr
    assert new_sweep.returncode == 2 and "holds the runs of an earlier sweep" in new_sweep.stderr
    assert (sweep / "0" / "summary.json").read_bytes() == swept
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
    assert (run / ".hydra" / "config.yaml").read_bytes() == config


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """The default folders are named by the second; runs launched together (seeds in parallel)
    shared one, and Hydra overwrote the saved config of the one that ran; two sweeps shared
    their job folders."""
    import datetime

    from bilevel import cli as app
    from bilevel.cli import folders

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    def folder(*args):  # what the entry point chooses: preflight composes, then the folder
        _, composed = app.preflight(list(args))
        return folders.default_folder(list(args), composed)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(folders.datetime, "datetime", Frozen)
    chosen = [folder("experiment=tiny", f"seed={s}") for s in range(3)]
    assert chosen == [
        ["hydra.run.dir=runs/2026-01-02/03-04-05"],
        ["hydra.run.dir=runs/2026-01-02/03-04-05-1"],
        ["hydra.run.dir=runs/2026-01-02/03-04-05-2"],
    ]
    sweeps = [folder("-m", f"seed={s},9") for s in range(2)]
    assert sweeps == [
        ["hydra.sweep.dir=runs/multirun/2026-01-02/03-04-05"],
        ["hydra.sweep.dir=runs/multirun/2026-01-02/03-04-05-1"],
    ]
    for args in (["hydra.run.dir=mine"], ["-m", "seed=0,1", "hydra.sweep.dir=mine"]):
        assert folder(*args) == []  # a folder of the user's is theirs
    # a sweep that stops before its first job leaves no folder behind
    proc = cli("-m", "experiment=tiny", "seed=0,1", "trainer.stepz=3", cwd=tmp_path)
    assert proc.returncode != 0
    assert sorted(p.name for p in (tmp_path / "runs" / "multirun").iterdir()) == ["2026-01-02"]


# -- the methods on the default problem (issue: every method behind one switch) ----------------


def noisy_weight(summary):
    return summary["weights"]["d2"] + summary["weights"]["d3"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [["solver=sama", "trainer/inner_optimizer=adam"], ["solver=scalebio"]]
)
def test_sama_and_scalebio_move_weight_off_the_noisy_domains(run_cli, overrides):
    summary, _ = run_cli(*overrides)
    assert noisy_weight(summary) <= 0.1, summary["weights"]


@pytest.mark.slow
def test_odm_runs_and_meta_weight_net_beats_uniform(run_cli, tmp_path):
    odm, _ = run_cli("solver=odm", "trainer.steps=500", out=tmp_path / "odm")
    assert odm["solver"] == "odm" and odm["skipped_steps"] == 0
    assert abs(sum(odm["weights"].values()) - 1) < 1e-5
    uniform, _ = run_cli("trainer.learn_weights=false", out=tmp_path / "uniform")
    mwn, _ = run_cli("weights=meta_weight_net", out=tmp_path / "mwn")
    assert mwn["test"]["accuracy"] > uniform["test"]["accuracy"]
    # its numbers are per-example means (batch mean 1), not shares: the table says so
    title = format_summary(mwn, tmp_path / "mwn").strip().splitlines()[0]
    assert title.startswith("learned per-example weights: each domain's mean in the last batch")
    assert format_summary(uniform, tmp_path).strip().startswith("fixed domain weights")


def test_paths_with_spaces_quotes_and_a_home_tilde(tmp_path):
    """resume="<path>" was read with its quotes as part of the path ("does not exist"); a
    leading ~ made a folder named ~ in the working directory (hydra.run.dir) or a Hydra lexer
    error (resume)."""
    home = tmp_path / "home"
    home.mkdir()
    spaced = tmp_path / "my runs" / "run"
    cases = [  # in order, in one process: each resume continues the run before it
        ["experiment=tiny", "trainer.steps=20", f'hydra.run.dir="{spaced}"'],
        [f'resume="{spaced}"', "trainer.steps=40"],
        ["experiment=tiny", "trainer.steps=20", "hydra.run.dir=~/r"],
        ["resume=~/r", "trainer.steps=60"],
    ]
    for proc in cli_batch(cases, env={"HOME": str(home)}):
        assert proc.returncode == 0, proc.stderr
    assert read_summary(spaced)["steps"] == 40
    assert read_summary(home / "r")["steps"] == 60 and not (REPO / "~").exists()


def test_initial_weights_by_name_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    (proc,) = cli_batch(
        [
            [
                "experiment=tiny",
                "weights.init={d3:0.1,d0:0.4,d1:0.4,d2:0.1}",
                "trainer.learn_weights=false",
                "trainer.steps=2",
                f"hydra.run.dir={out}",
            ]
        ]
    )
    assert proc.returncode == 0, proc.stderr
    weights = read_summary(out)["weights"]
    assert {k: round(v, 6) for k, v in weights.items()} == {
        "d0": 0.4,
        "d1": 0.4,
        "d2": 0.1,
        "d3": 0.1,
    }
