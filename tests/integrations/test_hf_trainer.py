"""Domain weights inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``: the weights move off a
noise domain and appear in the logs, the mixin learns exactly what ``BilevelTrainer`` learns, a
resumed run ends with the weights of one left alone, gradient accumulation, LoRA, bf16 and a
compiled model work, and mistakes are one line."""

import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
datasets = pytest.importorskip("datasets", reason="needs the [corpora] extra")

import bilevel  # noqa: E402
from bilevel import BilevelTrainer, TrainerConfig  # noqa: E402
from bilevel.data import noisy_domains  # noqa: E402
from bilevel.errors import ConfigError  # noqa: E402
from bilevel.integrations.hf import DomainWeightsMixin  # noqa: E402
from bilevel.losses import cross_entropy, per_example_cross_entropy  # noqa: E402
from bilevel.solvers import build  # noqa: E402

Dataset = datasets.Dataset
V = 16


class MixinTrainer(DomainWeightsMixin, transformers.Trainer):
    pass


def token_rows(n: int, seed: int) -> list[list[int]]:
    """Sequences of tokens of the first half of the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(V // 2) for _ in range(16)] for _ in range(n)]


def lm_data(names=("clean", "noise"), as_names=True):
    """``clean``: the sequences are their own labels, as in the meta set; ``noise``: the same
    kind of sequences with labels drawn over the whole vocabulary (label noise: the inputs do
    not tell the domains apart, the targets contradict each other)."""
    rows, labels, domains = [], [], []
    rng = random.Random(5)
    for k, name in enumerate(names):
        seqs = token_rows(200, k)
        rows += seqs
        labels += seqs if k == 0 else [[rng.randrange(V) for _ in s] for s in seqs]
        domains += [name if as_names else k] * 200
    train = Dataset.from_dict({"input_ids": rows, "labels": labels, "domain": domains})
    meta = Dataset.from_dict({"input_ids": token_rows(24, 9)})
    return train, meta


def lm_collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples])
    labels = torch.tensor([e.get("labels", e["input_ids"]) for e in examples])
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def tiny_gpt(attn="eager"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation=attn
    )
    return transformers.GPT2LMHeadModel(config)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        max_steps=30,
        learning_rate=2e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def lm_trainer(tmp_path, model=None, trainer_class=MixinTrainer, train=None, **kw):
    data, meta = lm_data()
    options = dict(outer_every=5, outer_optimizer=0.2)
    options.update({k: kw.pop(k) for k in list(kw) if k in ("solver", "sampling", "outer_every")})
    return trainer_class(
        model=model or tiny_gpt(),
        args=args(tmp_path, **kw),
        train_dataset=train if train is not None else data,
        data_collator=lm_collate,
        domain_weights=bilevel.DomainWeights(["clean", "noise"]),
        meta_dataset=meta,
        **options,
    )


def test_the_causal_lm_loss_per_example_is_the_models_own_loss():
    """Example by example, the loss the weights multiply is the one the model computes from
    the same labels: shifted by one, the -100 positions left out."""
    from bilevel.integrations.hf.losses import per_example_loss

    model = tiny_gpt().eval()  # no dropout
    ids = torch.tensor(token_rows(4, 3))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 9:] = -100
    out = model(input_ids=ids)
    ours = per_example_loss(out, {"labels": labels}, shift=True)
    theirs = torch.stack(
        [model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss for i in range(4)]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampling", ["loss", "weights"])
def test_the_weights_move_off_a_noise_domain_and_appear_in_the_logs(tmp_path, sampling):
    trainer = lm_trainer(tmp_path, sampling=sampling)
    trainer.train()
    weights = trainer.domain_weights.as_dict()
    assert weights["noise"] < 0.45 < weights["clean"]
    logged = [h for h in trainer.state.log_history if "weights/clean" in h]
    assert [h["step"] for h in logged] == [10, 20, 30]
    assert abs(logged[-1]["weights/clean"] - weights["clean"]) < 1e-6
    assert {"domain_loss/clean", "domain_loss/noise", "meta_loss"} <= set(logged[-1])


class Net(nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 16), nn.Linear(16, c)

    def forward(self, x, labels=None):
        return {"logits": self.b(torch.tanh(self.a(x)))}


@pytest.mark.parametrize("solver", [{"name": "first_order"}, {"name": "cg", "iters": 3}])
def test_the_mixin_learns_the_weights_bilevel_trainer_learns(tmp_path, solver):
    """The same data, seed, solver and schedule, full batches so that the batches agree: the
    mixin takes the same products (the last step's graph) and meta gradients, to 1e-5."""
    data = noisy_domains(per_domain=24, meta_size=20, test_size=20, seed=0, dim=6, num_classes=3)
    n = len(data.train["domain"])
    torch.manual_seed(0)
    ours, theirs = Net(6, 3), Net(6, 3)
    theirs.load_state_dict(ours.state_dict())
    w_ours, w_theirs = bilevel.DomainWeights(data.names), bilevel.DomainWeights(data.names)
    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    BilevelTrainer(
        ours,
        w_ours,
        build(**solver),
        per_example_cross_entropy,
        cross_entropy,
        data,
        TrainerConfig(steps=20, outer_every=5, batch_size=n, sampling="size", progress=False),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        outer_optimizer=adam,
    ).fit()
    rows = {
        "x": data.train["x"].tolist(),
        "labels": data.train["y"].tolist(),
        "domain": data.train["domain"].tolist(),
    }
    meta = {"x": data.meta["x"].tolist(), "labels": data.meta["y"].tolist()}

    def collate(examples):
        return {
            "x": torch.tensor([e["x"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    MixinTrainer(
        model=theirs,
        args=args(
            tmp_path,
            per_device_train_batch_size=n,
            max_steps=20,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            remove_unused_columns=False,
        ),
        train_dataset=Dataset.from_dict(rows),
        data_collator=collate,
        domain_weights=w_theirs,
        meta_dataset=Dataset.from_dict(meta),
        solver=build(**solver),
        outer_every=5,
        outer_optimizer=adam,
        meta_batch_size=len(meta["x"]),
    ).train()
    gap = (w_ours.value() - w_theirs.value()).abs().max().item()
    assert gap < 1e-5, (w_ours.as_dict(), w_theirs.as_dict())
    assert w_ours.as_dict()["d2"] < 0.25  # and they did learn: the noisy domains go down


def test_a_resumed_run_ends_with_the_weights_of_one_left_alone(tmp_path):
    kw = dict(save_strategy="steps", save_steps=10, max_steps=30)
    straight = lm_trainer(tmp_path / "a", **kw)
    straight.train()
    first = lm_trainer(tmp_path / "b", **kw)
    first.args.max_steps = 30
    first.train()  # the same run, and its checkpoint at step 10 is where the next one resumes
    resumed = lm_trainer(tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-10"))
    a, b = straight.domain_weights.value(), resumed.domain_weights.value()
    assert torch.equal(a, b), (a, b)


def test_gradient_accumulation_lora_and_bf16_run(tmp_path):
    peft = pytest.importorskip("peft", reason="needs the [hf] extra")
    model = peft.get_peft_model(
        tiny_gpt(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    trainer = lm_trainer(
        tmp_path,
        model=model,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
        bf16=True,
        max_steps=20,
        learning_rate=5e-3,
    )
    trainer.train()
    weights = trainer.domain_weights.as_dict()
    assert weights["clean"] > 0.5 and trainer.bilevel.path == "graph"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)


def test_fused_attention_switches_to_finite_differences_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="bilevel"):
        trainer = lm_trainer(tmp_path, model=tiny_gpt(attn="sdpa"), max_steps=10)
    assert "attention is sdpa" in caplog.text and "finite-difference products" in caplog.text
    assert trainer.bilevel.solver.products == "finite_difference"
    trainer.train()
    assert trainer.domain_weights.as_dict()["clean"] > 0.5


def test_a_compiled_model_trains(tmp_path):
    trainer = lm_trainer(tmp_path, max_steps=10, torch_compile=True)
    trainer.train()
    assert trainer.domain_weights.as_dict()["clean"] > 0.5


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is an optional extra")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *[f"w{i}" for i in range(V - 2)]])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>"
    )

    rng = random.Random(0)

    def text(row):
        return " ".join(f"w{t}" for t in row)

    clean = [text(r) for r in token_rows(96, 0)]  # first-half words; noise: any word
    noise = [text([rng.randrange(V - 2) for _ in range(16)]) for _ in range(96)]
    train = Dataset.from_dict({"text": clean + noise, "domain": [0] * 96 + [1] * 96})
    meta = Dataset.from_dict({"text": [text(r) for r in token_rows(24, 9)]})

    class SFT(DomainWeightsMixin, trl.SFTTrainer):
        pass

    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=16,
        max_steps=20,
        learning_rate=2e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = SFT(
        model=tiny_gpt(),
        args=config,
        train_dataset=train,
        processing_class=tok,
        domain_weights=bilevel.DomainWeights(["clean", "noise"]),
        meta_dataset=meta,
        outer_every=5,
        outer_optimizer=0.2,
    )
    trainer.train()
    assert trainer.domain_weights.as_dict()["clean"] > 0.5
    assert any("weights/noise" in h for h in trainer.state.log_history)


def test_mistakes_are_one_line(tmp_path):
    with pytest.raises(TypeError, match=r"must come before the trainer class"):

        class Wrong(transformers.Trainer, DomainWeightsMixin):
            pass

    train, meta = lm_data()
    with pytest.raises(ValueError, match="has no 'domain' column"):
        lm_trainer(tmp_path, train=train.remove_columns("domain"))
    bad = train.map(lambda r: {"domain": "nosie" if r["domain"] == "noise" else r["domain"]})
    with pytest.raises(ValueError, match="'nosie' in the train dataset is not one of"):
        lm_trainer(tmp_path, train=bad)
    with pytest.raises(ConfigError, match="unrolled runs its own window"):
        lm_trainer(tmp_path, solver="unrolled")
    with pytest.raises(ValueError, match=r"meta_dataset: none of its columns \(text\) is an input"):
        MixinTrainer(
            model=tiny_gpt(),
            args=args(tmp_path),
            train_dataset=train,
            data_collator=lm_collate,
            domain_weights=bilevel.DomainWeights(["clean", "noise"]),
            meta_dataset=Dataset.from_dict({"text": ["not tokens"] * 4}),
        )
    trainer = lm_trainer(tmp_path, max_steps=2)
    trainer.data_collator = lm_collate  # replaced after the trainer was built: drops 'domain'
    with pytest.raises(ValueError, match="the batch has no 'domain' column"):
        trainer.train()

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, labels=None, attention_mask=None):
            return {"loss": self.w.sum() + 1.0}

    trainer = lm_trainer(tmp_path, model=NoLogits(), max_steps=2)
    with pytest.raises(ValueError, match="has no logits, from which a loss per example"):
        trainer.train()


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_two_ranks_keeps_the_weights_identical(tmp_path):
    """examples/hf_trainer_ddp.py under torchrun: every rank ends with the same weights."""
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [str(REPO / "examples" / "hf_trainer_ddp.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"weights-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0][0] > 0.6  # the clean domain
