"""Hugging Face models as the inner model: LoRA hypergradients equal the long way."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
pytest.importorskip("peft", reason="needs the [hf] extra")

import bilevel  # noqa: E402
from bilevel import DomainWeights, make_outer_loss, make_per_domain_loss  # noqa: E402
from bilevel.functional import trainable_params  # noqa: E402
from bilevel.models.hf import HFClassifier  # noqa: E402
from bilevel.solvers import build  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def make(path, trainable, head="classification"):
    torch.manual_seed(1)
    model = HFClassifier(num_labels=4, path=str(path), trainable=trainable, head=head, lora_r=2)
    model = model.double()
    for name, p in model.named_parameters():  # LoRA B starts at 0: move it so products matter
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def batches():
    g = torch.Generator().manual_seed(0)
    n, t = 12, 8
    mask = torch.ones(n, t, dtype=torch.int64)
    mask[::3, 6:] = 0
    train = {
        "x": {"input_ids": torch.randint(0, 40, (n, t), generator=g), "attention_mask": mask},
        "y": torch.randint(0, 4, (n,), generator=g),
        "domain": torch.arange(n) % K,
    }
    meta = {
        "x": {
            "input_ids": torch.randint(0, 40, (6, t), generator=g),
            "attention_mask": torch.ones(6, t, dtype=torch.int64),
        },
        "y": torch.randint(0, 4, (6,), generator=g),
    }
    return train, meta


def per_example(out, batch):
    return F.cross_entropy(out, batch["y"], reduction="none")


def mean_ce(out, batch):
    return F.cross_entropy(out, batch["y"])


def test_trainable_subsets(tiny_checkpoint):
    lora = trainable_params(make(tiny_checkpoint, "lora"))
    assert lora and all("lora_" in n or n.startswith("head.") for n in lora)
    head = trainable_params(make(tiny_checkpoint, "head"))
    assert set(head) == {"head.weight", "head.bias"}
    full = make(tiny_checkpoint, "all")
    assert len(trainable_params(full)) > len(lora)


def long_way(model, train, meta, weights, solver, lr):
    """The hypergradient by autograd through an explicit function of the flat LoRA vector."""
    params = trainable_params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    flat0 = torch.cat([p.flatten() for p in params.values()])

    def unflat(flat):
        return {
            n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)
        }

    def per_domain(flat):
        out = torch.func.functional_call(
            model, unflat(flat), args=(), kwargs=train["x"], strict=False
        )
        losses = per_example(out, train)
        return torch.stack([losses[train["domain"] == k].mean() for k in range(K)])

    def meta_loss(flat):
        out = torch.func.functional_call(
            model, unflat(flat), args=(), kwargs=meta["x"], strict=False
        )
        return mean_ce(out, meta)

    logits = weights.logits.detach().clone().requires_grad_(True)
    w = bilevel.weights.apply_parametrization(weights.parametrization, logits)
    if solver == "unrolled":
        flat = flat0.clone().requires_grad_(True)
        cur = flat
        for _ in range(3):
            (g,) = torch.autograd.grad((w * per_domain(cur)).sum(), cur, create_graph=True)
            cur = cur - lr * g
        return torch.autograd.grad(meta_loss(cur), logits)[0]
    jac = torch.autograd.functional.jacobian(per_domain, flat0)  # [K, P]
    g_meta = torch.autograd.functional.jacobian(meta_loss, flat0)
    if solver == "first_order":
        a = -lr * (jac @ g_meta)
    else:
        wv = w.detach()
        hess = torch.autograd.functional.hessian(lambda f: wv @ per_domain(f), flat0)
        a = -(
            jac @ torch.linalg.solve(hess + 1.0 * torch.eye(len(flat0), dtype=hess.dtype), g_meta)
        )
    return torch.autograd.grad(w, logits, a)[0]


@pytest.mark.parametrize("solver", ["first_order", "unrolled", "cg"])
def test_lora_hypergradient_equals_the_long_way(tiny_checkpoint, solver):
    model = make(tiny_checkpoint, "lora")
    train, meta = batches()
    weights = DomainWeights(["a", "b", "c"], init=[0.5, 0.3, 0.2], dtype=torch.float64)
    opts = {"unrolled": {"steps": 3}, "cg": {"iters": 200, "damping": 1.0, "tol": 1e-12}}
    got = bilevel.hypergradient(
        build(solver, **opts.get(solver, {})),
        make_per_domain_loss(model, train, per_example, K),
        make_outer_loss(model, meta, mean_ce),
        trainable_params(model),
        weights,
        inner_lr=0.2,
    )
    expected = long_way(model, train, meta, weights, solver, 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)


def test_step_head_scores_each_step(tiny_checkpoint):
    model = make(tiny_checkpoint, "head", head="step")
    x = {
        "input_ids": torch.randint(0, 40, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
        "step_positions": torch.tensor([[2, 5, 7], [1, 3, 4]]),
    }
    assert model(**x).shape == (2, 3)


@pytest.mark.parametrize("solver", ["first_order", "cg", "unrolled"])
@pytest.mark.parametrize("precision,checkpointing", [("bf16", False), ("fp32", True)])
def test_trainer_with_hf_model_bf16_and_checkpointing(
    tiny_checkpoint, solver, precision, checkpointing
):
    from bilevel import BilevelTrainer, TrainerConfig
    from bilevel.data import DomainData
    from bilevel.data.evaluate import classification_metrics

    torch.manual_seed(0)
    model = HFClassifier(
        num_labels=4,
        path=str(tiny_checkpoint),
        trainable="lora",
        lora_r=2,
        gradient_checkpointing=checkpointing,
    )
    train, meta = batches()
    data = DomainData(["a", "b", "c"], train, meta, test=meta, evaluate=classification_metrics)
    trainer = BilevelTrainer(
        model,
        DomainWeights(data.names),
        build(solver, **({"steps": 2} if solver == "unrolled" else {})),
        per_example,
        mean_ce,
        data,
        TrainerConfig(
            steps=6, outer_every=3, batch_size=6, precision=precision, progress=False, log_every=3
        ),
    )
    summary = trainer.fit()
    assert summary["skipped_steps"] == 0
    assert all(v == v for v in summary["weights"].values())


@pytest.mark.parametrize(
    "kwargs,field,what",
    [
        ({"attn_implementation": "sdpa"}, "model.attn_implementation", "sdpa (a fused attention"),
        (
            {"gradient_checkpointing": "reentrant"},
            "model.gradient_checkpointing",
            "reentrant activation checkpointing",
        ),
    ],
)
def test_fused_kernels_need_finite_difference_products(tiny_checkpoint, kwargs, field, what):
    from bilevel import BilevelTrainer, TrainerConfig
    from bilevel.data import DomainData
    from bilevel.errors import ConfigError

    train, meta = batches()
    data = DomainData(["a", "b", "c"], train, meta)

    def trainer(solver):
        torch.manual_seed(0)
        model = HFClassifier(num_labels=4, path=str(tiny_checkpoint), trainable="lora", **kwargs)
        return BilevelTrainer(
            model,
            DomainWeights(data.names),
            solver,
            per_example,
            mean_ce,
            data,
            TrainerConfig(steps=4, outer_every=2, batch_size=6, progress=False),
        )

    for solver in (build("cg", iters=2), build("first_order"), build("unrolled", steps=2)):
        with pytest.raises(ConfigError, match=field) as refused:
            trainer(solver)
        assert what in str(refused.value)
        assert " has no double backward or forward mode, which " in str(refused.value)
    summary = trainer(build("cg", iters=2, products="finite_difference")).fit()
    assert summary["skipped_steps"] == 0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"trainable": "everything"}, "model.trainable"),
        ({"lora_r": 0}, "model.lora_r"),
        ({"lora_r": 2.5}, "model.lora_r"),
        ({"lora_alpha": float("inf")}, "model.lora_alpha"),
        ({"lora_dropout": 1.0}, "model.lora_dropout"),
        # a string reached peft as the set of its letters ({'o', 'n', 'p', 'e'} not found)
        ({"lora_targets": "query"}, "model.lora_targets"),
        ({"lora_targets": -3}, "model.lora_targets"),  # a number: "not iterable"
        ({"lora_targets": ["query", "nope"]}, "model.lora_targets"),
    ],
)
def test_bad_settings_are_refused_by_name(tiny_checkpoint, kwargs, field):
    """peft's own message (`r` should be a positive integer) named neither the key nor where
    to set it."""
    from bilevel.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^{field}: "):
        HFClassifier(num_labels=4, path=str(tiny_checkpoint), **kwargs)


def test_a_lora_target_the_model_lacks_is_named_with_the_ones_it_has(tiny_checkpoint):
    from bilevel.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        HFClassifier(num_labels=4, path=str(tiny_checkpoint), lora_targets=["query", "nope"])
    message = str(err.value)
    assert message.startswith("model.lora_targets: no module named nope in this BertModel")
    assert "linear layers are named dense, key, query, value" in message
    # a full dotted name works as in peft
    HFClassifier(num_labels=4, path=str(tiny_checkpoint), lora_targets=["attention.self.query"])


def test_token_ids_and_lengths_a_bert_cannot_read_are_one_line(tiny_checkpoint):
    """Ids of another tokenizer (>= its 40-token vocabulary) and sequences past its 16
    absolute positions failed when a batch drew them: an IndexError, a shape error from the
    position buffer, a process-ending device assert on a GPU."""
    from bilevel import BilevelTrainer, TrainerConfig
    from bilevel.data import DomainData
    from bilevel.errors import ConfigError

    def trainer(train):
        _, meta = batches()
        data = DomainData(["a", "b", "c"], train, meta)
        model = HFClassifier(num_labels=4, path=str(tiny_checkpoint), trainable="lora", lora_r=2)
        return BilevelTrainer(
            model,
            DomainWeights(data.names),
            build("first_order"),
            per_example,
            mean_ce,
            data,
            TrainerConfig(steps=2, batch_size=6, progress=False),
        )

    train, _ = batches()
    trainer(train)  # ids in [0, 40), 8 positions: accepted
    wide = {**train, "x": {**train["x"], "input_ids": train["x"]["input_ids"].clone()}}
    wide["x"]["input_ids"][4, 2] = 45
    with pytest.raises(ConfigError, match=r"^data.train: column x\['input_ids'\] holds token ids "):
        trainer(wide)
    ids = torch.zeros(12, 20, dtype=torch.int64)
    long = {**train, "x": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    with pytest.raises(ConfigError, match=r"sequences of 20 tokens but the model has position "):
        trainer(long)


def test_a_checkpoint_folder_without_weights_or_vocabulary_is_one_line(tiny_checkpoint, tmp_path):
    """A folder with only a config.json: the model's load failed with transformers' OSError
    and traceback, and its tokenizer loaded as one of special tokens only, which made every
    word [UNK] in a run that then exited 0."""
    from bilevel.errors import ConfigError
    from bilevel.models.hf import load_tokenizer

    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"model.path: cannot load a checkpoint from .*"):
        HFClassifier(num_labels=2, path=str(tmp_path), trainable="head")
    with pytest.raises(ConfigError, match=r"data.tokenizer: .* has no tokenizer vocabulary"):
        load_tokenizer(tmp_path)
    assert load_tokenizer()("hello world")["input_ids"]  # the bundled model's own is fine


def test_flash_attention_without_its_package_is_one_line(tiny_checkpoint):
    import importlib.util

    from bilevel.errors import ConfigError

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=r"model.attn_implementation: .*FlashAttention2"):
        HFClassifier(
            num_labels=2, path=str(tiny_checkpoint), attn_implementation="flash_attention_2"
        )


def test_a_lora_model_builds_where_warnings_are_errors(tiny_checkpoint):
    # peft reads transformers' deprecated is_gradient_checkpointing (a FutureWarning at every
    # get_peft_model): raised from inside bilevel in a user's suite that turns warnings into
    # errors, which it cannot act on
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HFClassifier(num_labels=2, path=str(tiny_checkpoint), trainable="lora")
