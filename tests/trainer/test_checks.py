"""What the trainer refuses before it trains, in one line each."""

import pytest
import torch
from torch import nn

import bilevel
from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
    make_outer_loss,
    make_per_domain_loss,
)
from bilevel.data import DomainData, noisy_domains
from bilevel.errors import ConfigError
from bilevel.functional import trainable_params
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build
from tests.helpers import cli, read_summary
from tests.trainer.helpers import SOLVERS, scheduled, small_trainer


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
