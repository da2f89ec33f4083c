"""resume= continues a run with its saved config, refuses changes, and branches into a folder of
its own."""

import pytest

from bilevel.errors import ConfigError
from bilevel.logging import read_jsonl
from tests.helpers import cli, cli_batch, read_summary


def test_resume_alone_restores_the_saved_config_and_refuses_changes(tmp_path):
    run = tmp_path / "run"
    refused = [
        (["solver=first_order"], "solver"),
        (["solver.iters=4"], "solver.iters"),
        (["model.hidden=[8]"], "model.hidden"),
        (["trainer/inner_optimizer=adam"], "trainer"),
        (["weights.parametrization=exp"], "weights.parametrization"),
        (["trainer.steps=10"], "trainer.steps"),
    ]
    first, *refusals, resumed = cli_batch(  # one process: the cases run in this order
        [
            ["experiment=tiny", "solver=cg", "solver.iters=3", "trainer.steps=20"]
            + [f"hydra.run.dir={run}"],
            *([f"resume={run}", *bad] for bad, _ in refused),
            [f"resume={run}", "trainer.steps=40", "trainer.log_every=5"],
        ]
    )
    assert first.returncode == 0, first.stderr
    for (bad, names), proc in zip(refused, refusals, strict=True):
        assert proc.returncode == 2, (bad, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and names in lines[0], (bad, proc.stderr)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0].startswith("continuing run directory")
    summary = read_summary(run)
    assert summary["steps"] == 40 and summary["solver"] == "cg"
    assert summary["solver_options"]["iters"] == 3
    assert not (tmp_path / "runs").exists()
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "weights" in r]
    assert steps == sorted(steps) and steps[-1] == 40


def test_resume_of_a_sweep_folder_names_one_of_its_jobs(tmp_path):
    from bilevel.logging.run_dir import claim, resolve_resume

    for job in ("0", "1", "10", "2"):
        claim(tmp_path / "sweep" / job)
    with pytest.raises(ConfigError, match=r"holds 4 run directories .*resume=.*sweep/0$"):
        resolve_resume(tmp_path / "sweep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="give a run directory that bilevel created"):
        resolve_resume(tmp_path / "empty")


def test_an_empty_resume_is_refused_not_read_as_the_current_folder():
    """``resume=$RUN`` with RUN unset: Path('') is '.', and the line spoke of the current folder
    as if it had been named."""
    from bilevel.logging.run_dir import resolve_resume

    with pytest.raises(ConfigError, match="resume: is empty"):
        resolve_resume("")
    (proc,) = cli_batch([["experiment=tiny", "resume="]])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "bilevel: error: resume: is empty: give the run directory to continue (resume=<run dir>)"
    )


def test_resume_into_an_explicit_folder_branches_and_leaves_the_run_alone(tmp_path, finished):
    """resume=<run> with hydra.run.dir=<other>: Hydra made the other folder (its .hydra and a
    cli.log telling the run's story) while the run went on writing into the resumed one. Now the
    run branches into the folder asked for, from the checkpoint, and the original is untouched."""
    import shutil

    run = shutil.copytree(finished, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    branch = tmp_path / "branch"
    proc = cli(f"resume={run}", "trainer.steps=60", f"hydra.run.dir={branch}")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert read_summary(branch)["steps"] == 60
    steps = [r["step"] for r in read_jsonl(branch / "metrics.jsonl") if "weights" in r]
    assert steps[0] == 0 and steps[-1] == 60  # the history up to the checkpoint, then the branch
    assert (branch / "checkpoints" / "last.pt").is_file()
    # the branch's .hydra/config.yaml is the run's config (it was the command line's: the
    # default experiment with resume=..., not the tiny run that was resumed)
    from omegaconf import OmegaConf

    ran, recorded = (OmegaConf.load(d / ".hydra" / "config.yaml") for d in (run, branch))
    assert recorded.trainer.steps == 60 and recorded.resume == str(run)
    recorded.trainer.steps, recorded.resume = ran.trainer.steps, ran.resume
    assert recorded == ran


def test_resume_with_a_key_of_another_solver_is_refused_as_a_change(finished):
    """The key exists only in a config the run does not have (cg's iters on a first_order
    run): it was reported as 'no such config key', as if it were a typo."""
    proc = cli(f"resume={finished}", "solver.iters=3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("bilevel: error: resume: these overrides would change what the ")
    assert "solver.iters" in lines[0]


def test_cfg_job_with_resume_shows_the_config_the_run_continues_with(finished):
    """`--cfg job` with resume= printed the defaults Hydra composes (3000 steps of the default
    experiment), not what the resumed run would train; now the run's saved config plus the
    harmless overrides given, and a refused override is refused here too."""
    import yaml

    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    shown, extended, refused = cli_batch(
        [
            [f"resume={finished}", "--cfg", "job"],
            [f"resume={finished}", "trainer.steps=60", "--cfg=job"],
            [f"resume={finished}", "solver=cg", "--cfg", "job"],
        ]
    )
    assert shown.returncode == 0 and shown.stdout.startswith("# the config resume=")
    config = yaml.safe_load(shown.stdout)
    assert config["trainer"]["steps"] == 40 and config["data"]["per_domain"] == 64  # tiny's
    assert yaml.safe_load(extended.stdout)["trainer"]["steps"] == 60
    assert refused.returncode == 2 and refused.stderr.startswith("bilevel: error: resume: ")
    # a look at the config: the run's files are as they were, and nothing new was made
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_resume_without_checkpoint_and_with_other_names(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    proc = cli("experiment=tiny", f"resume={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "bilevel: error: resume:" in proc.stderr
    assert "not a bilevel run directory" in proc.stderr
    run_cli("experiment=tiny", "trainer.steps=10", out=tmp_path / "first")
    (tmp_path / "first" / "checkpoints" / "last.pt").unlink()
    proc = cli("experiment=tiny", f"resume={tmp_path / 'first'}")
    assert proc.returncode == 2 and "bilevel: error: resume: no checkpoint" in proc.stderr
    run_cli("experiment=tiny", "trainer.steps=10", out=tmp_path / "second")
    proc = cli(
        "experiment=tiny",
        "data.names=[a,b,c,d]",
        f"resume={tmp_path / 'second'}",
        f"hydra.run.dir={tmp_path / 'r2'}",
    )
    assert proc.returncode == 2, proc.stderr
    assert "resume" in proc.stderr and "data.names" in proc.stderr
