"""One clear line for every mistake: each bad input below exits with code 2, prints exactly one
line ``bilevel: error: <field>: ...`` (no traceback) and leaves no run directory behind.

All cases run through the real entry point in one subprocess (:func:`cli_batch`), so the table
can grow without each case paying the start-up of torch and Hydra.
"""

import pytest
import torch

from tests.helpers import cli_batch

BUILDERS = """
import torch
from bilevel.data import noisy_domains

def empty_domain(**kwargs):
    d = noisy_domains(**kwargs)
    keep = d.train["domain"] != 2
    d.train = {k: v[keep] for k, v in d.train.items()}
    return d

def no_meta(**kwargs):
    d = noisy_domains(**kwargs)
    d.meta = None
    return d

def float64_inputs(**kwargs):  # the library's model is float32
    d = noisy_domains(**kwargs)
    d.train["x"] = d.train["x"].double()
    return d

def float64_test(**kwargs):  # found before training, not after it
    d = noisy_domains(**kwargs)
    d.test["x"] = d.test["x"].double()
    return d

def integer_inputs(**kwargs):  # e.g. pixels as uint8 / int64: "mat1 and mat2 must have ..."
    d = noisy_domains(**kwargs)
    d.train["x"] = d.train["x"].round().long()
    return d

def float_labels(**kwargs):  # "expected target dtype to be Long", from inside torch
    d = noisy_domains(**kwargs)
    d.meta["y"] = d.meta["y"].float()
    return d

def int32_labels(**kwargs):  # "expected target dtype to be Long or Byte, but got Int"
    d = noisy_domains(**kwargs)
    d.train["y"] = d.train["y"].int()
    return d

def bool_test_labels(**kwargs):  # the same, found before training, not after it
    d = noisy_domains(**kwargs)
    d.test["y"] = d.test["y"] > 0
    return d

def inputs_with_grad(**kwargs):  # "Trying to backward through the graph a second time"
    d = noisy_domains(**kwargs)
    d.train["x"] = d.train["x"] * torch.ones(1, requires_grad=True)
    return d

def meta_without_labels(**kwargs):  # a bare KeyError: 'y'
    d = noisy_domains(**kwargs)
    del d.meta["y"]
    return d
"""

CASES = [
    # data
    (["data.label_noise=[0.1,0.2]"], "data.label_noise"),
    (["data.label_noise=[0.0,0.0,1.2,0.0]"], "data.label_noise"),
    (["data.per_domain=0"], "data.per_domain"),
    # a string was read letter by letter: four domains a, b, c, d, and a run that exited 0
    (["data.names=abcd"], "data.names"),
    (["data.label_noise=0.4"], "data.label_noise"),
    # a rate that is not a number: "'<=' not supported between instances of 'int' and 'str'"
    (["data=digits", "data.label_noise=abc"], "data.label_noise"),
    (["data._target_=builders.empty_domain"], "data"),
    (["data._target_=builders.no_meta"], "data.meta"),
    (["data._target_=builders.float64_inputs"], "data.train"),
    (["data._target_=builders.float64_test"], "data.test"),
    (["data._target_=builders.integer_inputs"], "data.train"),
    (["data._target_=builders.float_labels"], "data.meta"),
    (["data._target_=builders.meta_without_labels"], "data.meta"),
    (["data._target_=builders.int32_labels"], "data.train: column 'y' is int32"),
    (["data._target_=builders.bool_test_labels"], "data.test: column 'y' is bool"),
    (["data._target_=builders.inputs_with_grad"], "data.train: column 'x' requires grad"),
    (["domains=d0"], "domains"),  # a name where a list is meant
    (["data.meta_size=-3"], "data.meta_size"),
    (["data.per_domain=1.5"], "data.per_domain"),
    # weights
    (["+weights.names=[a,b,c,d]"], "weights.names"),
    (["weights.init=[0.5,0.5]"], "weights.init"),
    (["weights.init=[0.5,-0.1,0.3,0.3]"], "weights.init"),
    (["weights.init=[0.5,0.0,0.25,0.25]"], "weights.init"),
    (["weights.init=[inf,1,1,1]"], "weights"),
    (["weights.init=abc"], "weights.init"),
    (
        ["weights.parametrization=sigmoid", "trainer/outer_optimizer=mirror_descent"],
        "weights.parametrization",
    ),
    # model
    (["model.hidden=0"], "model"),  # a zero-width layer trained silently to chance
    (["model.hidden=abc"], "model"),
    # a model or a loss of the library that does not fit the data (a traceback from inside it
    # before, or a silent misreading)
    (["model=step_scorer"], "model"),
    (["model=tiny_gpt"], "model"),
    (["inner_loss=token_cross_entropy"], "inner_loss"),
    (["outer_loss=token_cross_entropy"], "outer_loss"),
    # a preset that reads a key of another group the chosen one does not have (text data reads
    # ${model.path}, the tokenizer of its model; model=mlp has none)
    (["+data.tokenizer=${model.path}"], "data: reads ${model.path}, which the chosen model"),
    # what a sweep optimizes: a split the data lacks, found before training
    (["optimized_metric=val.loss"], "optimized_metric: val.loss needs a validation split"),
    # solver
    (["solver.name=adam"], "solver"),
    (["solver=newton"], "solver"),
    (["solver.products=symbolic"], "solver"),
    (["solver=unrolled", "solver.steps=10"], "solver.steps"),
    (["solver=unrolled", "trainer/inner_optimizer=adam"], "solver"),
    (["solver=unrolled", "solver.backend=higher"], "solver.backend"),
    (["solver=doremi"], "solver.reference"),
    (["solver=doremi", "solver.reference=/nonexistent/run"], "solver.reference"),
    (["solver=doremi", "solver.reference=-3"], "solver.reference: must be the run directory"),
    (["solver=doremi", "solver.reference=''"], "solver.reference: must be the run directory"),
    (["solver=neumann", "solver.alpha=inf"], "solver"),
    (["solver=cg", "solver.damping=inf"], "solver"),
    (["solver=scalebio", "solver.alpha=inf"], "solver"),
    (["solver=doge", "solver.lr=inf"], "solver"),
    # losses
    (["outer_loss._target_=no_such_module.loss"], "outer_loss"),
    (["outer_loss._target_=bilevel.losses.no_such_loss"], "outer_loss"),
    (["inner_loss._target_=bilevel.nope.loss"], "inner_loss"),
    (["outer_loss._target_=bilevel.losses.per_example_cross_entropy"], "outer_loss"),
    (["inner_loss._target_=bilevel.losses.cross_entropy"], "inner_loss"),
    (["outer_loss._target_=os.getcwd"], "outer_loss"),  # not a function of (output, batch)
    (["inner_loss._target_=builtins.len"], "inner_loss"),
    # optimizers: torch refuses a negative lr only; inf, nan and 0 train to nothing or to nan
    (["trainer.inner_optimizer.lr=-0.1"], "trainer.inner_optimizer"),
    (["trainer.inner_optimizer.lr=abc"], "trainer.inner_optimizer"),
    (["trainer.inner_optimizer.lr=0"], "trainer.inner_optimizer.lr"),
    (["trainer/inner_optimizer=adam", "trainer.inner_optimizer.lr=nan"], "trainer.inner_optimizer"),
    (["trainer.outer_optimizer.lr=-1"], "trainer.outer_optimizer"),
    (["trainer.outer_optimizer.lr=inf"], "trainer.outer_optimizer.lr"),
    (
        ["trainer/outer_optimizer=mirror_descent", "trainer.outer_optimizer.lr=inf"],
        "trainer.outer_optimizer",
    ),
    # the loop
    (["trainer.outer_every=0"], "trainer.outer_every"),
    (["trainer.precision=fp16"], "trainer.precision"),
    (["trainer.hessian_batch=both"], "trainer.hessian_batch"),
    (["trainer.sampling=temperature"], "trainer.sampling"),
    (["trainer.inner_lr=inf"], "trainer.inner_lr"),
    (["trainer.meta_batch_size=abc"], "trainer.meta_batch_size"),
    (["trainer/inner_scheduler=cosin"], "trainer/inner_scheduler"),
    (  # steps on a metric: the trainer steps it once per inner step without one
        [
            "+trainer.inner_scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "+trainer.inner_scheduler._partial_=true",
        ],
        "trainer.inner_scheduler",
    ),
    # switches: a string is truthy in Python and would turn the option on
    (["trainer.learn_weights=maybe"], "trainer.learn_weights"),
    (["solver=cg", "solver.warm_start=yes"], "solver"),
    (["solver=neumann", "solver.simultaneous=1"], "solver"),
    (["print_config=maybe"], "print_config"),
    (["trainer.inner_optimizer.fused=maybe"], "trainer.inner_optimizer.fused"),
    # a sweep without -m: Hydra's "Ambiguous value" (exit 1, several lines) or a traceback
    (["solver=first_order,cg"], "solver: solver=first_order,cg is a sweep"),
    (["trainer.steps=range(1,3)"], "trainer.steps: trainer.steps=range(1,3) is a sweep"),
    (["trainer=null"], "Config group override must be a string"),
    # initial weights by name: every domain, and only domains
    (["weights.init={d0:0.4,d1:0.4,d2:0.2}"], "weights.init: gives no value for ['d3']"),
    (["weights.init={d0:1,d1:1,d2:1,d3:1,d9:1}"], "weights.init: names no domain ['d9']"),
    # '+' (add a key) on a key the preset has: Hydra's "Could not append to config"
    (["+trainer.inner_optimizer.lr=0.2"], "trainer.inner_optimizer.lr: the config already"),
    (["weights=meta_weight_net", "weights.use_domain=no"], "weights"),
    (["trainer.strategy=fsdp", "solver.products=finite_difference"], "trainer.strategy"),
    (["weights=meta_weight_net", "trainer.sampling=weights"], "trainer.sampling"),
    # the run
    (["logger=wandb", "logger.wandb.mode=onlin"], "logger.wandb"),
    (["logger=wandb", "logger.wandb.tags=baseline"], "logger.wandb"),
    (["seed=abc"], "seed"),
    (["seed=-1"], "seed"),  # numpy refused it inside the digits builder
    (["seed=99999999999999999999"], "seed"),  # "Overflow when unpacking long long"
    (["data.seed=1.5"], "data.seed"),  # int() cut it to 1
    (  # divides by zero at the first step: a traceback once training had started
        ["trainer/inner_scheduler=cosine", "trainer.inner_scheduler.T_max=0"],
        "trainer.inner_scheduler",
    ),
    (["device=gpu"], "device"),
    (["device=cuda:7"], "device"),
    (["resume=/nonexistent/run"], "resume"),
    (["hparams_search=optuna", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's CompletedProcess and the run directory it was pointed at."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "builders.py").write_text(BUILDERS)
    dirs = [root / f"case{i}" / "run" for i in range(len(CASES))]
    cases = [
        ["experiment=tiny", *args, f"hydra.run.dir={out}"]
        for (args, _), out in zip(CASES, dirs, strict=True)
    ]
    procs = cli_batch(cases, env={"PYTHONPATH": str(root)}, processes=2)
    return dict(zip(range(len(CASES)), zip(procs, dirs, strict=True), strict=True))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(args) for args, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_no_directory(outcomes, index):
    args, field = CASES[index]
    if "device=cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    proc, out = outcomes[index]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bilevel: error: {field}"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path):
    """Hydra creates the run folder before the app starts; where it cannot (a file in the
    path, a read-only or virtual file system) that was a FileNotFoundError traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        ["experiment=tiny", f"hydra.run.dir={blocker / 'run'}"],
        ["-m", "experiment=tiny", "seed=0,1", f"hydra.sweep.dir={blocker / 'sweep'}"],
    ]
    for proc, field in zip(cli_batch(cases), ["run directory", "sweep directory"], strict=True):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"bilevel: error: {field}: cannot create")
    assert blocker.read_text() == "not a folder"


def test_a_failed_run_removes_only_the_folders_it_created(tmp_path):
    """Hydra creates every folder on the way to the run directory; a failed validation removes
    those again, but never a folder that existed before: an empty one of the user's named as
    the run directory, or the folder that holds the new run directory (it used to go too when
    it had become empty, as it was 'recent' by its change time: the user's current folder)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    holder = tmp_path / "holder"
    holder.mkdir()
    cases = [
        ["experiment=tiny", "trainer.steps=0", f"hydra.run.dir={mine}"],
        ["experiment=tiny", "trainer.steps=0", f"hydra.run.dir={holder / 'run'}"],
        ["experiment=tiny", "trainer.steps=0", f"hydra.run.dir={tmp_path / 'a' / 'b' / 'c'}"],
    ]
    for proc in cli_batch(cases):
        assert proc.returncode == 2 and "trainer.steps" in proc.stderr, proc.stderr
    assert mine.is_dir() and not any(mine.iterdir())  # kept, and Hydra's files taken out
    assert holder.is_dir() and not any(holder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holder", "mine"]


def test_a_sweep_with_a_bad_key_option_or_search_space_is_one_line(tmp_path):
    """Hydra's multi-line report (exit 1), or a traceback for an interval given to the basic
    sweeper, and a sweep folder holding only multirun.yaml left behind. Every option of a swept
    group is composed: the bad one need not be the first."""
    cases = [
        (["seed=0,1", "trainer.stepz=3"], "trainer.stepz: no such config key"),
        (["solver=cg,newton"], "solver: unknown option 'newton'"),
        (["seed=interval(0,1)"], "BasicSweeper does not support sweep type"),
    ]
    runs = [
        ["-m", "experiment=tiny", *args, f"hydra.sweep.dir={tmp_path / str(i) / 'sweep'}"]
        for i, (args, _) in enumerate(cases)
    ]
    for proc, (_, line) in zip(cli_batch(runs), cases, strict=True):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and line in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_misspelt_key_or_target_gets_a_suggestion(tmp_path):
    cases = [
        ["experiment=tiny", "trainer.step=10"],
        ["experiment=tiny", "sed=3"],
        ["experiment=tiny", "outer_loss._target_=bilevel.losses.cross_entropi"],
        # a key of another option of the group: '+solver.alpha=...' only passed it on to cg,
        # which does not take it
        ["experiment=tiny", "solver=cg", "solver.alpha=0.1"],
        ["experiment=tiny", "solver.iterz=3"],
        # a key of an option not chosen at all (no schedule by default)
        ["experiment=tiny", "trainer.inner_scheduler.T_max=10"],
        # another option's key beats a close name: fd_step, _target_ and label_noise were
        # suggested for unrolled's steps, hf's lora_targets and digits' pixel_noise
        ["experiment=tiny", "solver.steps=3"],
        ["experiment=tiny", "model.lora_targets=[query]"],
        ["experiment=tiny", "data.pixel_noise=0.1"],
    ]
    hints = [
        "trainer.step: no such config key; did you mean trainer.steps?",
        "sed: no such config key; did you mean seed?",
        "did you mean 'cross_entropy'",
        "solver.alpha: solver=cg has no key 'alpha' (its keys: name, iters, damping, tol, "
        "warm_start, products, fd_step); alpha belongs to solver neumann, scalebio: choose one "
        "(solver=...)",
        "solver.iterz: solver=first_order has no key 'iterz' (its keys: name, products, fd_step)"
        "; to pass a new key to its component write +solver.iterz=...",
        "trainer.inner_scheduler.T_max: no option of trainer/inner_scheduler is chosen; T_max "
        "belongs to trainer.inner_scheduler cosine: choose one (trainer/inner_scheduler=...)",
        "steps belongs to solver unrolled: choose one (solver=...)",
        "lora_targets belongs to model hf: choose one (model=...)",
        "pixel_noise belongs to data digits: choose one (data=...)",
    ]
    runs = [[*args, f"hydra.run.dir={tmp_path / str(i)}"] for i, args in enumerate(cases)]
    for proc, hint in zip(cli_batch(runs), hints, strict=True):
        assert proc.returncode == 2 and hint in proc.stderr, proc.stderr
