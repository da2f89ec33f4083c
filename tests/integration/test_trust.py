"""Trust at the edges: no silent wrong result (float64, schedulers, small batches, NaN meta
sets, the H batch), and one line for every mistake."""

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
    make_outer_loss,
    make_per_domain_loss,
)
from bilevel.cli import format_summary
from bilevel.data import DomainData, noisy_domains
from bilevel.errors import ConfigError, NonFiniteError
from bilevel.functional import trainable_params
from bilevel.logging import read_jsonl
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from tests.integration.helpers import cli, cli_batch, read_summary

SOLVERS = {
    "first_order": {},
    "unrolled": {"steps": 2},
    "neumann": {"iters": 3},
    "cg": {"iters": 3},
    "sama": {},
    "cg-warm": {"iters": 1, "warm_start": True},
    "first_order-fd": {"products": "finite_difference"},
    "cg-fd": {"iters": 2, "products": "finite_difference"},
}


def float64_data():
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].double()
    return data


def own_inner(output, batch):  # a user's own losses, in whatever dtype the model computes
    return ((output - F.one_hot(batch["y"], output.shape[-1]).to(output.dtype)) ** 2).sum(1)


def own_outer(output, batch):
    return F.cross_entropy(output, batch["y"])


@pytest.mark.parametrize("key", list(SOLVERS))
def test_every_solver_trains_a_float64_model_in_float64(key):
    name = key.split("-")[0]
    data = float64_data()
    torch.manual_seed(0)
    model = MLP(**data.model_kwargs, hidden=8).double()
    weights = DomainWeights(data.names, dtype=torch.float64)
    trainer = BilevelTrainer(
        model,
        weights,
        build(name, **SOLVERS[key]),
        own_inner,
        own_outer,
        data,
        TrainerConfig(steps=10, outer_every=5, batch_size=16, progress=False, log_every=5),
    )
    grads = []
    original = trainer._apply
    trainer._apply = lambda update: (grads.append(update.grad), original(update))[1]
    summary = trainer.fit()
    assert summary["skipped_steps"] == 0
    assert grads and all(g.dtype == torch.float64 for g in grads)
    assert trainer.weights.logits.dtype == torch.float64


def test_float64_model_with_default_float32_weights_promotes():
    data = float64_data()
    model = MLP(**data.model_kwargs, hidden=8).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),  # float32 logits
        build("cg", iters=2),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=5, outer_every=5, batch_size=16, progress=False),
    )
    assert trainer.fit()["skipped_steps"] == 0


# -- one meaning for inner_lr; the scheduler stepped in every path ------------------------------


def scheduled(solver, inner_lr=None, steps=10):
    torch.manual_seed(0)
    data = noisy_domains(per_domain=64, meta_size=32, test_size=64, seed=0)
    model = MLP(**data.model_kwargs, hidden=8)
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        build(solver, **({"steps": 2} if solver == "unrolled" else {})),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=steps, outer_every=5, batch_size=16, progress=False, inner_lr=inner_lr),
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.2),
        inner_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
    )
    return trainer


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


# -- small batches ------------------------------------------------------------------------------


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


def test_size_sampling_does_not_starve_a_small_domain(run_cli, tmp_path):
    (tmp_path / "skewed.py").write_text(
        "from bilevel.data import noisy_domains\n"
        "from bilevel.data.columns import take\n"
        "import torch\n"
        "def skewed(**kw):\n"
        "    d = noisy_domains(**kw)\n"
        "    keep = torch.cat([torch.arange(0, 1000), torch.arange(1000, 2000),\n"
        "                      torch.arange(2000, 2010)])\n"
        "    d.names = d.names[:3]\n"
        "    d.train = take(d.train, keep)\n"
        "    d.info = {}\n"
        "    return d\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        summary, out = run_cli(
            "experiment=tiny",
            "data._target_=skewed.skewed",
            "data.per_domain=1000",
            "data.names=[a,b,c,d]",
            "data.label_noise=[0,0,0,0]",
            "trainer.sampling=size",
            "trainer.batch_size=64",
            "trainer.steps=100",
            "trainer.log_every=5",
        )
    finally:
        sys.path.remove(str(tmp_path))
    losses = [
        r["domain_loss"]["c"] for r in read_jsonl(out / "metrics.jsonl") if "domain_loss" in r
    ]
    assert any(v > 0 for v in losses)  # drawn (about 1 row in 3 batches), never starved
    assert summary["weights"]["c"] != pytest.approx(1 / 3, abs=1e-6)


# -- NaN in the meta set --------------------------------------------------------------------------


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


# -- the Hessian from an independent batch ---------------------------------------------------------


def test_hessian_loss_takes_h_from_the_other_batch():
    torch.manual_seed(0)
    d, k = 5, 3
    xs = [torch.randn(20, d, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(20, dtype=torch.float64) for _ in range(2)]
    dom = torch.arange(20) % k
    xm, ym = torch.randn(9, d, dtype=torch.float64), torch.randn(9, dtype=torch.float64)

    def per_domain(x, y):
        def f(p):
            err = 0.5 * (x @ p["t"] - y) ** 2 + 0.1 * (p["t"] ** 2).sum()
            return torch.zeros(k, dtype=err.dtype).index_add(0, dom, err) / torch.bincount(
                dom, minlength=k
            )

        return f

    meta = lambda p: 0.5 * ((xm @ p["t"] - ym) ** 2).mean()  # noqa: E731
    w = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    theta = {"t": torch.randn(d, dtype=torch.float64)}
    got = bilevel.hypergradient(
        build("cg", iters=50, tol=1e-14),
        per_domain(xs[0], ys[0]),
        meta,
        theta,
        w,
        wrt="values",
        hessian_loss=per_domain(xs[1], ys[1]),
    )
    wv = w.value().detach()
    flat = theta["t"]
    jac = torch.autograd.functional.jacobian(lambda t: per_domain(xs[0], ys[0])({"t": t}), flat)
    hess = torch.autograd.functional.hessian(
        lambda t: wv @ per_domain(xs[1], ys[1])({"t": t}), flat
    )
    g_meta = torch.autograd.functional.jacobian(lambda t: meta({"t": t}), flat)
    torch.testing.assert_close(got, -(jac @ torch.linalg.solve(hess, g_meta)))


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_trainer_runs_with_an_independent_hessian_batch(run_cli, solver):
    summary, _ = run_cli("experiment=tiny", f"solver={solver}", "trainer.hessian_batch=independent")
    assert summary["skipped_steps"] == 0


# -- one clear line for every mistake --------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its directory and checkpoint)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = cli("experiment=tiny", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out


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


# -- files that are not ours -------------------------------------------------------------------


def test_resume_from_a_checkpoint_in_a_foreign_folder_touches_nothing_there(tmp_path, finished):
    foreign = tmp_path / "some" / "dir"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("mine\n")
    (foreign / "summary.json").write_text('{"mine": 1}')
    (foreign / "sub" / "foo.pt").write_bytes((finished / "checkpoints" / "last.pt").read_bytes())
    before = {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    new = tmp_path / "new"
    proc = cli(f"resume={foreign / 'sub' / 'foo.pt'}", "trainer.steps=60", f"hydra.run.dir={new}")
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before
    assert read_summary(new)["steps"] == 60 and read_summary(new)["resumed_from"]


def test_a_run_directory_with_foreign_files_is_refused(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    proc = cli("experiment=tiny", f"hydra.run.dir={target}")
    assert proc.returncode == 2 and "bilevel: error: run directory" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]  # not even Hydra's files
    assert (target / "notes.txt").read_text() == "keep me"


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


def test_summary_records_the_strategy_and_parameter_counts(run_cli):
    summary, out = run_cli("experiment=tiny")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["strategy"] == "ddp" and on_disk["world_size"] == 1
    assert on_disk["parameter_elements"] == on_disk["parameter_elements_per_rank"] > 0


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


def test_domain_data_from_plain_tensors_float64_end_to_end():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    data = DomainData(
        names=["a", "b", "c"],
        train={"x": x, "y": y, "domain": torch.arange(60) % 3},
        meta={"x": x[:10], "y": y[:10]},
    )
    model = nn.Linear(3, 2).double()
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names, dtype=torch.float64),
        build("neumann", iters=2),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=10, batch_size=9, progress=False),
    )
    assert trainer.fit()["steps"] == 10


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


def test_meta_weight_net_with_a_sampler_that_applies_weights_is_one_line(tmp_path):
    proc = cli(
        "experiment=tiny",
        "weights=meta_weight_net",
        "trainer.sampling=weights",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bilevel: error: trainer.sampling")


def small_trainer(
    config,
    solver=None,
    outer_loss=cross_entropy,
    activation="relu",
    data=None,
    run_dir=None,
    model=None,
    inner_loss=per_example_cross_entropy,
    weights=None,
    **kwargs,
):
    """A first_order trainer of a small MLP (or ``model``) on a small noisy_domains problem;
    ``kwargs`` go to :class:`BilevelTrainer`."""
    # `is None`, not `or`: a compiled module answers truthiness with "does not support len()"
    data = (
        noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0) if data is None else data
    )
    return BilevelTrainer(
        MLP(**data.model_kwargs, hidden=8, activation=activation) if model is None else model,
        DomainWeights(data.names) if weights is None else weights,
        build("first_order") if solver is None else solver,
        inner_loss,
        outer_loss,
        data,
        config,
        run_dir=run_dir,
        **kwargs,
    )


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


@pytest.mark.parametrize("key", list(SOLVERS))
def test_a_meta_loss_that_ignores_the_model_is_refused_and_its_paths_give_zeros(key):
    """Refused before training (the weights could never move); swapped in afterwards (the
    ``outer_loss`` setter), every solver's trainer path still gives exact zeros, not a failure
    inside autograd (unrolled raised there)."""
    config = TrainerConfig(steps=10, outer_every=5, batch_size=16, progress=False)
    solver = lambda: build(key.split("-")[0], **SOLVERS[key])  # noqa: E731
    constant = lambda output, batch: torch.tensor(0.3)  # noqa: E731
    with pytest.raises(ConfigError, match="outer_loss: carries no gradient"):
        small_trainer(config, solver=solver(), outer_loss=constant, activation="gelu")
    trainer = small_trainer(config, solver=solver(), activation="gelu")
    trainer.outer_loss = constant
    summary = trainer.fit()
    assert summary["outer_updates"] == 2 and summary["skipped_steps"] == 0
    assert all(v == 0.25 for v in summary["weights"].values())


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


def test_float16_weights_are_refused_with_one_line():
    """They trained silently wrong: Adam's eps and the squared hypergradients round to 0 in
    float16, and two domains of the default problem went to weight 0.0 (float32, bfloat16
    and float64 agree on other values). bfloat16 weights train."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    config = TrainerConfig(steps=10, progress=False)
    with pytest.raises(ConfigError, match="^weights: float16 weights train wrong"):
        small_trainer(config, weights=DomainWeights(data.names, dtype=torch.float16))
    small_trainer(config, weights=DomainWeights(data.names, dtype=torch.bfloat16)).fit()


def test_a_half_precision_model_is_told_to_use_autocast_instead():
    """A bfloat16 MLP trained with exit 0 and stayed at chance: its SGD steps were smaller
    than half a unit in the last place of its parameters, rounded away."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    for columns in (data.train, data.meta, data.test):
        columns["x"] = columns["x"].bfloat16()
    model = MLP(**data.model_kwargs, hidden=8).bfloat16()
    notes = small_trainer(TrainerConfig(steps=5, progress=False), data=data, model=model).notes
    assert any("trainable parameters are bfloat16" in n and "precision=bf16" in n for n in notes)
    plain = small_trainer(TrainerConfig(steps=5, progress=False)).notes
    assert not any("trainable parameters are" in n for n in plain)


def test_the_trainer_checks_device_and_seed_as_the_command_line_does():
    """From Python these failed inside torch ('Torch not compiled with CUDA enabled', a list
    of every device type) or at the first batch (a TypeError from the sampler's seed)."""
    config = TrainerConfig(steps=5, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but CUDA is not"):
            small_trainer(config, device="cuda")
    with pytest.raises(ConfigError, match="device: unknown device 'gpu'"):
        small_trainer(config, device="gpu")
    with pytest.raises(ConfigError, match=r"seed: must be an integer in \[0, 2\*\*32\), got 'abc'"):
        small_trainer(config, seed="abc")
    assert small_trainer(config, device="auto", seed=3).device.type in ("cpu", "cuda")
    # 'meta' (and a device type torch knows but this machine lacks) failed at the first tensor
    # moved there, with a traceback from inside the model
    with pytest.raises(ConfigError, match="device: 'meta' tensors hold shapes but no data"):
        small_trainer(config, device="meta")
    if not torch.xpu.is_available():
        with pytest.raises(ConfigError, match="device: 'xpu' requested but it is not available"):
            small_trainer(config, device="xpu")


def test_resume_of_a_sweep_folder_names_one_of_its_jobs(tmp_path):
    from bilevel.logging.run_dir import claim, resolve_resume

    for job in ("0", "1", "10", "2"):
        claim(tmp_path / "sweep" / job)
    with pytest.raises(ConfigError, match=r"holds 4 run directories .*resume=.*sweep/0$"):
        resolve_resume(tmp_path / "sweep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="give a run directory that bilevel created"):
        resolve_resume(tmp_path / "empty")


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


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, finished):
    """The same resume launched twice (or a requeued job while its first copy still runs)
    would interleave two runs' records and checkpoints in one folder."""
    import shutil
    import subprocess
    import sys

    from bilevel.logging import run_dir as run_dirs

    run = shutil.copytree(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen(  # another process holds the run directory
        [
            sys.executable,
            "-c",
            "import sys, time; from bilevel.logging import run_dir as r\n"
            f"with r.locked({str(run)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cli(f"resume={run}", "trainer.steps=60")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{run} is in use by bilevel process {holder.pid}" in lines[0]
        assert (run / "metrics.jsonl").read_text() == before  # nothing of the run was touched
    finally:
        holder.kill()
        holder.wait()
    with run_dirs.locked(run):  # the lock ends with its process: no stale lock is left
        pass


def test_trainer_arguments_of_the_wrong_kind_are_named():
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)

    def make(**changes):
        args = dict(
            model=MLP(**data.model_kwargs, hidden=8),
            weights=DomainWeights(data.names),
            solver=build("first_order"),
            inner_loss=per_example_cross_entropy,
            outer_loss=cross_entropy,
            data=data,
            config=TrainerConfig(steps=10, progress=False),
        )
        return BilevelTrainer(**{**args, **changes})

    with pytest.raises(TypeError, match="data must be a bilevel.data.DomainData"):
        make(data={"train": data.train})
    with pytest.raises(TypeError, match="weights must be a bilevel.DomainWeights"):
        make(weights=torch.ones(4))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        make(model=lambda x: x)
    with pytest.raises(ConfigError, match="model: the model has no parameters"):
        make(model=nn.ReLU())
    with pytest.raises(TypeError, match="config must be a bilevel.TrainerConfig"):
        make(config=[10])
    with pytest.raises(ConfigError, match=r"^trainer.stepz: no such setting; did you mean steps\?"):
        make(config={"stepz": 10})
    # a solver's name and a dict of settings are what they stand for
    trainer = make(solver="cg", config={"steps": 10, "progress": False})
    assert trainer.method.name == "cg" and trainer.config.steps == 10


@pytest.mark.parametrize(
    "solver,options",
    [
        ("first_order", {}),
        ("cg", {}),
        ("neumann", {"iters": 1, "warm_start": True}),
        ("unrolled", {"steps": 2}),
        ("sama", {}),
        ("doge", {}),
        ("first_order", {"products": "finite_difference"}),
        ("cg", {"products": "finite_difference"}),
        ("odm", {}),
        ("loss_reweighting", {}),
    ],
)
def test_running_statistics_are_moved_by_the_inner_steps_only(solver, options):
    """BatchNorm's running statistics: the meta-loss forward, finite-difference passes at
    perturbed parameters and the setup's loss check updated them too (26 to 106 updates for 20
    inner steps), pulling the statistics used at evaluation towards the meta set."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(data.model_kwargs["in_dim"], 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, data.model_kwargs["out_dim"]),
    )
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        build(solver, **options),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=20, outer_every=5, batch_size=16, progress=False),
    )
    summary = trainer.fit()
    assert summary["outer_updates"] == (0 if solver == "loss_reweighting" else 4)
    assert int(model[1].num_batches_tracked) == 20
    # loss_reweighting's table said "no outer step ran: trainer.steps < trainer.outer_every"
    assert summary["moves_weights"] == (solver != "loss_reweighting")
    title = format_summary(summary, Path("run")).strip().splitlines()[0]
    assert ("kept as set: loss_reweighting weights examples" in title) == (
        solver == "loss_reweighting"
    )
    assert "no outer step ran" not in title


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


def test_labels_outside_the_models_outputs_are_one_line_before_training():
    """A label the model has no output for failed only when a batch drew it: an IndexError on
    the CPU, a device-side assert that ends the process on a GPU."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    data.meta["y"] = data.meta["y"].clone()
    data.meta["y"][3] = data.model_kwargs["out_dim"]  # one past the last class
    with pytest.raises(ConfigError, match=r"data.meta: column 'y' holds labels outside \[0, 4\)"):
        small_trainer(TrainerConfig(steps=10, progress=False), data=data)
    data.meta["y"][3] = -100  # cross-entropy's ignored label is allowed
    small_trainer(TrainerConfig(steps=10, progress=False), data=data)


def test_labels_with_an_extra_dimension_are_one_line_before_training():
    """[N, 1] labels (a column cut from a table) reached torch's cross entropy as '0D or 1D
    target tensor expected, multi-target not supported', a traceback from inside the step."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    data.train["y"] = data.train["y"].unsqueeze(1)
    with pytest.raises(ConfigError, match=r"data.train: column 'y' has shape \(128, 1\).*squeeze"):
        small_trainer(TrainerConfig(steps=10, progress=False), data=data)


@pytest.mark.parametrize("value", [[0.5] * 16, (1,) * 16, "abc"])
def test_a_column_that_is_not_a_tensor_is_refused_by_name(value):
    """A batch takes rows of tensors only and handed any other value whole to every batch:
    a list of features met the model as a TypeError, a per-example list read by one's own
    loss would have been silently out of step with the batch."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    data.meta["extra"] = value
    with pytest.raises(ConfigError, match=r"data.meta: column 'extra' is a \w+, not a tensor"):
        data.validate()
    data.meta["extra"] = {"nested": value}
    with pytest.raises(ConfigError, match=r"column 'extra.nested' is a"):
        data.validate()


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    trainer = small_trainer(TrainerConfig(steps=10, progress=False), run_dir=tmp_path / "file")
    with pytest.raises(ConfigError, match="run_dir: cannot create .* is a file, not a directory"):
        trainer.fit()
    assert (tmp_path / "file").read_text() == "mine"


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


def test_an_evaluator_answering_tensors_finishes_its_run(tmp_path):
    """A metric returned as a one-element tensor reached the summary as a Tensor, whose JSON
    write failed after the whole run had trained."""
    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    data.evaluate = lambda model, columns, device: {"acc": torch.tensor(0.75)}
    trainer = small_trainer(TrainerConfig(steps=10, progress=False), data=data, run_dir=tmp_path)
    assert trainer.fit()["test"] == {"acc": 0.75}
    assert read_summary(tmp_path)["test"] == {"acc": 0.75}


def test_step_positions_past_the_sequence_are_one_line_before_training():
    """A step head gathers each step's score at x['step_positions']: a position past the
    sequence failed only when a batch drew it (an IndexError, a device assert on a GPU)."""
    from bilevel.trainer.input_checks import check_step_positions

    ids = torch.zeros(6, 10, dtype=torch.int64)
    positions = torch.tensor([[3, 7, -1]] * 6)  # -1: a padded step
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "step_positions": positions}
    meta = {"x": dict(x), "outcome": torch.ones(6)}
    data = DomainData(["a"], {"x": x, "domain": torch.zeros(6, dtype=torch.int64)}, meta)
    step_head = nn.Module()
    step_head.head_kind = "step"  # as the Hugging Face wrapper's step head says
    check_step_positions(step_head, data)  # within the 10 tokens: accepted
    meta["x"]["step_positions"] = torch.tensor([[3, 10, -1]] * 6)
    with pytest.raises(ConfigError, match=r"data.meta: column x\['step_positions'\] holds posit"):
        check_step_positions(step_head, data)
    # int32 positions: the step head's gather takes int64 only; a model of one's own may
    # read them as it likes
    meta["x"]["step_positions"] = positions.int()
    with pytest.raises(ConfigError, match=r"data.meta: column x\['step_positions'\] is int32"):
        check_step_positions(step_head, data)
    check_step_positions(nn.Linear(2, 2), data)


def test_token_ids_outside_the_models_embedding_are_one_line_before_training():
    """The same for token ids: an id past the embedding (another tokenizer's) failed when a
    batch drew it. Checked for a model that names its input embedding the Hugging Face way
    (TinyGPT, the HF wrappers): a plain integer x, or x['input_ids']."""
    from bilevel_experiments.lm_mixture.builders import lm_mixture

    from bilevel.losses import per_sequence_token_cross_entropy, token_cross_entropy
    from bilevel.models import TinyGPT

    data = lm_mixture(per_domain=16, meta_size=8, test_size=8, seq_len=8, seed=0)
    data.test["x"] = data.test["x"].clone()
    data.test["x"][2, 5] = data.model_kwargs["vocab_size"]  # one past the last token
    with pytest.raises(ConfigError, match=r"^data.test: column x holds token ids outside \[0, "):
        small_trainer(
            TrainerConfig(steps=2, progress=False),
            data=data,
            model=TinyGPT(**data.model_kwargs, d_model=8, heads=2, layers=1),
            inner_loss=per_sequence_token_cross_entropy,
            outer_loss=token_cross_entropy,
        )

    class Wrapped(nn.Module):  # an HF-style encoder inside a classifier, ids in a mapping
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.get_input_embeddings = lambda: self.embed
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids).mean(1))

    def texts(n, top):
        ids = torch.randint(0, top, (n, 5), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def mixture(top):
        return DomainData(
            names=["a", "b"],
            train={
                "x": texts(16, top),
                "y": torch.arange(16) % 2,
                "domain": torch.arange(16) // 8,
            },
            meta={"x": texts(8, 10), "y": torch.arange(8) % 2},
        )

    config = TrainerConfig(steps=2, batch_size=4, progress=False)
    small_trainer(config, data=mixture(10), model=Wrapped())
    with pytest.raises(ConfigError, match=r"^data.train: column x\['input_ids'\] holds token"):
        small_trainer(config, data=mixture(12), model=Wrapped())


def test_a_loss_without_a_gradient_is_refused_where_a_method_differentiates_it():
    """An accuracy as meta loss (argmax and ==) or a detached loss gave a zero hypergradient:
    the run ended with exit 0 and the weights at their start, silently. The trainer now
    refuses it before training, naming the loss; methods that never differentiate the meta
    loss (fixed weights, ODM) still accept it, e.g. to log an accuracy."""

    def accuracy_loss(output, batch):
        return 1 - (output.argmax(-1) == batch["y"]).float().mean()

    config = TrainerConfig(steps=2, outer_every=1, batch_size=16, progress=False)
    for solver in [build("first_order"), build("unrolled", steps=1), build("cg")]:
        with pytest.raises(ConfigError, match="outer_loss: carries no gradient"):
            small_trainer(config, solver, outer_loss=accuracy_loss)
    detached = lambda output, batch: cross_entropy(output, batch).detach()  # noqa: E731
    with pytest.raises(ConfigError, match="outer_loss: carries no gradient"):
        small_trainer(config, outer_loss=detached)
    fixed = TrainerConfig(steps=2, batch_size=16, progress=False, learn_weights=False)
    assert small_trainer(fixed, outer_loss=accuracy_loss).fit()["steps"] == 2
    from bilevel.methods import ODM

    assert small_trainer(config, ODM(), outer_loss=accuracy_loss).fit()["steps"] == 2
    with pytest.raises(ConfigError, match="inner_loss: carries no gradient"):
        small_trainer(
            config,
            inner_loss=lambda output, batch: per_example_cross_entropy(output, batch).detach(),
        )


def test_evaluation_gives_every_submodule_its_own_mode_back():
    """``model.eval()`` ... ``model.train(was)`` around the meta loss and the test metrics set
    every submodule to training: a BatchNorm the user froze (eval mode) for fine-tuning trained
    from the first log line on. An evaluator of the user's that leaves the model in eval mode
    must not stop the training that follows either (dropout off, statistics frozen)."""
    from bilevel.data.evaluate import classification_metrics

    data = noisy_domains(per_domain=32, meta_size=16, test_size=16, seed=0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model[1].eval()  # frozen statistics
    frozen = model[1].running_mean.clone()

    def careless(module, columns, device):  # forgets to give the mode back
        module.eval()
        return classification_metrics(module, columns, device)

    data.evaluate = careless
    config = TrainerConfig(
        steps=10, outer_every=5, eval_every=5, log_every=5, batch_size=16, progress=False
    )
    small_trainer(config, data=data, model=model).fit()
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, frozen)


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


@pytest.mark.parametrize(
    "name,value,said",
    [
        ("WANDB_MODE", "bogus", "is not a wandb mode"),
        ("WANDB_SILENT", "", "WANDB_SILENT='' is refused by wandb"),
        ("WANDB_CONSOLE", "nope", "WANDB_CONSOLE='nope' is refused by wandb"),
    ],
)
def test_a_wandb_variable_that_wandb_refuses_is_named_before_the_run(
    monkeypatch, name, value, said
):
    pytest.importorskip("wandb")
    from bilevel.logging import WandbLogger

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=said):
        WandbLogger()


def test_a_wandb_run_that_cannot_start_is_one_line_and_leaves_the_folder_unclaimed(
    monkeypatch, tmp_path
):
    wandb = pytest.importorskip("wandb")
    from bilevel.logging import WandbLogger, run_dir

    def unreachable(**kwargs):  # what an online run on a machine without internet ends in
        (tmp_path / "run" / "wandb" / "debug.log").parent.mkdir(parents=True)
        (tmp_path / "run" / "wandb" / "debug.log").write_text("...")
        raise wandb.errors.CommError("Timed out while retrying: no such host\ndetails")

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setattr(wandb, "teardown", lambda: None)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite's offline mode would win
    trainer = scheduled("first_order")
    trainer.run_dir = tmp_path / "run"
    trainer.wandb = WandbLogger(mode="online")
    with pytest.raises(ConfigError) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith("logger.wandb: wandb could not start its run (mode online): ")
    assert "no such host" in message and "WANDB_MODE=offline" in message
    assert "details" not in message
    # nothing of the run is left: the folder can hold a new run (Hydra's files are the CLI's)
    assert list((tmp_path / "run").iterdir()) == []
    assert not run_dir.is_run_dir(tmp_path / "run")
    again = scheduled("first_order")
    again.run_dir = tmp_path / "run"
    again.fit()
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("key", ["inner_optimizer", "outer_optimizer", "inner_scheduler"])
def test_an_optimizer_or_scheduler_already_built_is_one_line(key):
    """The trainer takes factories; an instance failed with "'SGD' object is not callable"."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    built = {
        "inner_optimizer": other,
        "outer_optimizer": torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1),
        "inner_scheduler": torch.optim.lr_scheduler.StepLR(other, step_size=1),
    }[key]
    with pytest.raises(ConfigError, match=rf"^trainer.{key}: takes a function of the "):
        BilevelTrainer(
            MLP(**data.model_kwargs, hidden=4),
            DomainWeights(data.names),
            build("first_order"),
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(steps=5, progress=False),
            **{key: built},
        )


@pytest.mark.parametrize("holds", ["some", "more"])
def test_an_inner_optimizer_over_other_tensors_than_the_trainable_ones_is_refused(holds):
    """An optimizer over half the model: the trainer's fused step still moved every trainable
    tensor, and the hypergradient counted them all as inner variables."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)
    stray = torch.zeros(3, requires_grad=True)

    def factory(params):
        params = list(params)
        return torch.optim.SGD(params[:2] if holds == "some" else [*params, stray], lr=0.1)

    message = "leaves out 2 of the 4 trainable tensors" if holds == "some" else "holds 1"
    with pytest.raises(ConfigError, match=rf"^trainer.inner_optimizer: {message}"):
        small_trainer(TrainerConfig(steps=5, progress=False), data=data, inner_optimizer=factory)


def test_an_outer_optimizer_over_other_tensors_than_the_weights_is_refused():
    """It left the weights where they started, and the run ended with exit 0."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)
    stray = torch.zeros(3, requires_grad=True)
    with pytest.raises(ConfigError, match=r"^trainer.outer_optimizer: leaves out 1 of the 1 "):
        small_trainer(
            TrainerConfig(steps=5, progress=False),
            data=data,
            outer_optimizer=lambda params: torch.optim.Adam([stray], lr=0.1),
        )


@pytest.mark.parametrize("key", ["inner_loss", "outer_loss"])
def test_a_loss_that_is_not_a_function_is_named_in_python_too(key):
    """The command line said so; the Python trainer failed with "'str' object is not callable"."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)
    losses = {"inner_loss": per_example_cross_entropy, "outer_loss": cross_entropy}
    losses[key] = "cross_entropy"
    with pytest.raises(ConfigError, match=rf"^{key}: must be a callable \(output, batch\)"):
        BilevelTrainer(
            MLP(**data.model_kwargs, hidden=4),
            DomainWeights(data.names),
            build("first_order"),
            losses["inner_loss"],
            losses["outer_loss"],
            data,
            TrainerConfig(steps=5, progress=False),
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


def test_a_compiled_model_with_autograd_products_is_one_line_and_runs_with_finite_differences():
    """torch.compile's backward takes no double backward: a traceback from inside torch
    ("compiled with non-empty donated buffers"); with finite differences, ``model or net``
    asked the compiled module for its length and failed with "MLP does not support len()"."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)

    def make(solver):
        return small_trainer(
            TrainerConfig(steps=2, outer_every=2, batch_size=8, progress=False),
            solver,
            data=data,
            model=torch.compile(MLP(**data.model_kwargs, hidden=4)),
        )

    with pytest.raises(ConfigError, match=r"^model: a torch.compile'd model: .*finite_difference"):
        make(build("cg"))
    trainer = make(build("first_order", products="finite_difference"))
    assert trainer.fit()["steps"] == 2
    # the public API cannot see the model: it says what the error from inside torch means
    batch, meta = trainer.loop.last_batch, trainer.meta_sampler.columns
    with pytest.raises(RuntimeError, match="torch.compile'd model, whose compiled backward"):
        bilevel.hypergradient(
            build("cg", iters=1),
            make_per_domain_loss(trainer.module, batch, per_example_cross_entropy, 4),
            make_outer_loss(trainer.module, meta, cross_entropy),
            trainable_params(trainer.module),
            trainer.weights,
        )


def test_the_shipped_metrics_read_logits_from_a_dict_or_tuple_output_and_refuse_others_at_start():
    """A model returning {"logits": ...} (as Hugging Face models do) trained the whole run and
    then failed in the test evaluation with "'dict' object has no attribute 'float'"."""
    data = noisy_domains(per_domain=16, meta_size=8, test_size=8, seed=0)

    class Wrapped(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.net, self.key = MLP(**data.model_kwargs, hidden=4), key

        def forward(self, x):
            out = self.net(x)
            return (out, out) if self.key is None else {self.key: out}

    def trainer(key):
        read = (lambda o: o[0]) if key is None else (lambda o: o[key])  # noqa: E731
        return small_trainer(
            TrainerConfig(steps=2, outer_every=2, batch_size=8, progress=False),
            data=data,
            model=Wrapped(key),
            inner_loss=lambda o, b: per_example_cross_entropy(read(o), b),
            outer_loss=lambda o, b: cross_entropy(read(o), b),
        )

    assert set(trainer("logits").fit()["test"]) == {"accuracy", "loss"}
    assert set(trainer(None).fit()["test"]) == {"accuracy", "loss"}
    with pytest.raises(ConfigError, match=r"^data.evaluate: .*a dict without a tensor 'logits'"):
        trainer("scores")


def test_only_rank_0_checks_the_run_folder_under_torchrun(tmp_path, monkeypatch):
    """Rank 1 checked the folder after rank 0 had claimed it, took it for an earlier run and
    stopped with exit 2 (a race: seen once in CI on test_fsdp_with_cg_runs)."""
    from bilevel.cli import folders as cli_folders
    from bilevel.logging.run_dir import claim

    claim(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')  # rank 0 has begun
    args = ["experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="holds an earlier run"):
        cli_folders.check_explicit(args)
    monkeypatch.setenv("RANK", "1")
    cli_folders.check_explicit(args)
