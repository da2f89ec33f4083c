"""The studies' presets run end to end (tiny variants); their builders make sense."""

import json

import pytest
import torch

from bilevel.losses import aggregation_loss, pairwise_ranking_loss, step_bce, trajectory_logits


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=digits", "trainer.steps=20", "trainer.eval_every=10"],
        ["experiment=digits", "trainer.steps=20", "domains=[clean,imbalanced]", "solver=cg"],
        [
            "experiment=lm_mixture",
            "trainer.steps=10",
            "trainer.eval_every=5",
            "data.per_domain=32",
            "data.test_size=16",
        ],
        [
            "experiment=prm",
            "trainer.steps=10",
            "data.per_domain=32",
            "data.test_problems=4",
            "data.meta_problems=4",
        ],
        [
            "experiment=prm",
            "trainer.steps=10",
            "data.per_domain=32",
            "data.test_problems=4",
            "data.meta_problems=4",
            "outer_loss=pairwise_ranking",
            "outer_loss.aggregation=min",
        ],
    ],
)
def test_study_presets_run(run_cli, overrides):
    summary, _ = run_cli(*overrides)
    assert summary["steps"] == int(overrides[1].split("=")[1])
    assert summary["test"]


def test_digits_domains_are_disjoint_and_corrupted():
    from bilevel_experiments.digits.builders import DIGITS_DOMAINS, digits

    data = digits(seed=0)
    assert data.names == list(DIGITS_DOMAINS)
    sizes = data.domain_sizes()
    assert sizes == [150] * 5
    x, y, d = data.train["x"], data.train["y"], data.train["domain"]
    imbalanced = y[d == DIGITS_DOMAINS.index("imbalanced")]
    assert ((imbalanced == 0) | (imbalanced == 1)).float().mean() > 0.7
    clean = x[d == 0]
    assert clean.min() >= 0 and clean.max() <= 1
    assert x[d == DIGITS_DOMAINS.index("pixel_noise")].std() > 2 * clean.std()


def test_study_builders_refuse_settings_that_would_run_as_another():
    """A negative pixel noise acted as its absolute value, an empty target mixture as the
    default one, a test fraction of 1 failed with a message about another key."""
    from bilevel_experiments.digits.builders import digits
    from bilevel_experiments.lm_mixture.builders import lm_mixture
    from bilevel_experiments.text_domains.builders import text_domains

    from bilevel.errors import ConfigError

    with pytest.raises(ConfigError, match="data.pixel_noise"):
        digits(pixel_noise=-1.0)
    with pytest.raises(ConfigError, match="data.target"):
        lm_mixture(per_domain=8, target={})
    for fraction in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="data.test_fraction"):
            text_domains(test_fraction=fraction)
    # the same topic twice was two classes of the same texts; a string, its letters
    with pytest.raises(ConfigError, match="data.topics: lists ai more than once"):
        text_domains(topics=["ai", "ai", "coding"])
    with pytest.raises(ConfigError, match="data.topics: must be a list"):
        text_domains(topics="ai")
    from bilevel_experiments.prm_text.builders import prm_text

    with pytest.raises(ConfigError, match=r"data.trap_rate: must lie in \[0, 1\), got 'x'"):
        prm_text(trap_rate="x")


def test_lm_pretrained_refuses_a_meta_and_test_set_that_take_the_whole_target(monkeypatch, caplog):
    """The target's sequences go to the meta and test sets first: asking for more left the
    target with no training rows, reported as 'reviews has no training examples'."""
    from bilevel_experiments.lm_pretrained import builders, model

    from bilevel.errors import ConfigError

    class Characters:  # a stand-in for the SmolLM2 tokenizer (10 s to load): one id per byte
        def __len__(self):
            return 256

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    monkeypatch.setattr(model, "load_tokenizer", Characters)
    texts = {name: "abcdefgh" * 100 for name in builders.DOMAINS if name != "noise"}
    monkeypatch.setattr(builders, "domain_texts", lambda: texts)
    data = builders.lm_pretrained(seq_len=7, per_domain=50, meta_size=20, test_size=30)
    assert data.domain_sizes()[builders.DOMAINS.index("news")] == 50  # 100 - 20 - 30
    assert "per_domain" not in caplog.text
    # more than a domain holds: it trains on all it has, and the run's first lines say so
    with caplog.at_level("WARNING", logger="bilevel.experiments"):
        data = builders.lm_pretrained(seq_len=7, per_domain=80, meta_size=20, test_size=30)
    assert data.domain_sizes()[builders.DOMAINS.index("news")] == 50
    assert "data.per_domain=80 is more than news holds (50)" in caplog.text
    assert "encyclopedia" not in caplog.text  # 100 sequences: enough
    with pytest.raises(ConfigError, match=r"data.meta_size: the target 'news' holds 100 seq"):
        builders.lm_pretrained(seq_len=7, per_domain=50, meta_size=40, test_size=60)
    # a larger meta set from the sequences training leaves unused: the test set and the
    # training rows stay the same (texts of distinct sequences, so that equality means it)
    texts["news"] = "".join(f"{i:07d}" for i in range(100))  # "0000000", "0000001", ...
    small = builders.lm_pretrained(seq_len=6, per_domain=30, meta_size=10, test_size=20)
    large = builders.lm_pretrained(
        seq_len=6, per_domain=30, meta_size=10, test_size=20, extra_meta=25
    )

    def ids(columns):  # the whole sequences: x and its last target
        return torch.cat([columns["x"]["input_ids"], columns["y"][:, -1:]], 1)

    assert len(ids(large.meta)) == 35
    assert torch.equal(ids(large.meta)[:10], ids(small.meta))
    assert torch.equal(ids(large.test), ids(small.test))
    assert torch.equal(ids(large.train), ids(small.train))
    seen = {tuple(r.tolist()) for part in (large.train, large.test) for r in ids(part)}
    assert not seen & {tuple(r.tolist()) for r in ids(large.meta)}
    with pytest.raises(ConfigError, match=r"data.extra_meta: the target 'news' has 40 seq"):
        builders.lm_pretrained(seq_len=6, per_domain=30, meta_size=10, test_size=20, extra_meta=41)


def test_lm_domains_have_their_structure():
    from bilevel_experiments.lm_mixture.builders import LM_DOMAINS, lm_mixture

    data = lm_mixture(per_domain=64, seq_len=16, seed=0)
    x, d = data.train["x"], data.train["domain"]
    arithmetic = x[d == LM_DOMAINS.index("arithmetic")]
    assert (arithmetic == 27).any() and (arithmetic < 16).sum() == 0  # '=' present, no symbols
    assert torch.equal(data.train["x"][:, 1:], data.train["y"][:, :-1])  # y is x shifted
    assert data.info["target"]["markov_a"] == 0.5


def test_prm_labels_match_the_arithmetic():
    from bilevel_experiments.prm.builders import prm_trajectories

    data = prm_trajectories(per_domain=200, test_problems=5, candidates=4, seed=0)
    x, labels, d = data.train["x"], data.train["step_labels"], data.train["domain"]
    gold = d == 0
    prev, op, operand, stated = (
        x[gold][..., a:b].argmax(-1) for a, b in [(0, 10), (10, 13), (13, 23), (23, 33)]
    )
    right = (
        torch.where(op == 0, prev + operand, torch.where(op == 1, prev - operand, prev * operand))
        % 10
    )
    assert torch.equal((right == stated).float(), labels[gold])
    outcome = d == 3
    assert (labels[outcome] == labels[outcome][:, :1]).all()  # outcome-derived: constant
    assert data.test["candidates"][0] == 4 and len(data.test["outcome"]) == 20


def test_prm_losses_on_a_toy_batch():
    logits = torch.tensor([[3.0, 3.0, -3.0], [2.0, 2.0, 2.0]])
    batch = {
        "step_mask": torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
        "step_labels": torch.tensor([[1.0, 1, 0], [1, 1, 0]]),
        "outcome": torch.tensor([0.0, 1.0]),
        "problem": torch.tensor([0, 0]),
    }
    per_traj = step_bce(logits, batch)
    assert per_traj.shape == (2,)
    torch.testing.assert_close(
        trajectory_logits(logits, batch, "mean_logodds"), torch.tensor([1.0, 2.0])
    )
    torch.testing.assert_close(trajectory_logits(logits, batch, "min"), torch.tensor([-3.0, 2.0]))
    torch.testing.assert_close(trajectory_logits(logits, batch, "last"), torch.tensor([-3.0, 2.0]))
    for agg in ["mean_logodds", "min", "product", "last"]:
        assert aggregation_loss(logits, batch, agg).dim() == 0
    # the right solution (row 1, score 2) outranks the wrong one (row 0, score 1)
    torch.testing.assert_close(
        pairwise_ranking_loss(logits, batch), torch.nn.functional.softplus(torch.tensor(1.0 - 2.0))
    )
    with pytest.raises(ValueError, match="mean_logodds"):
        trajectory_logits(logits, batch, "median")


@pytest.mark.slow
def test_experiments_script_quick(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "scripts/experiments.py",
            "prm",
            "--quick",
            "--out",
            str(tmp_path),
            "--methods",
            # labels hold commas: the runner joins the pieces back into labels (this test
            # named a label that no longer existed, and ran uniform alone without a word)
            "uniform,first_order, aggregation BCE (DreamPRM uses MSE)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a smoke test's table and figures are named apart from the study's own
    assert (tmp_path / "results_quick.md").exists() and (tmp_path / "best_of_n_quick.png").exists()
    ran = json.loads((tmp_path / "results_quick.json").read_text())
    assert list(ran) == ["uniform", "first_order, aggregation BCE (DreamPRM uses MSE)"]
    assert not (tmp_path / "best_of_n.png").exists() and not (tmp_path / "results.json").exists()


# -- the studies on pretrained transformers --------------------------------------------------------


@pytest.mark.slow
def test_prm_text_runs_offline_from_the_cli(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from tests.helpers import cli, read_summary

    proc = cli(
        "experiment=prm_text",
        "trainer.steps=4",
        "trainer.batch_size=10",
        "data.per_domain=8",
        "data.test_problems=4",
        "data.meta_problems=2",
        "data.meta_candidates=4",
        f"hydra.run.dir={tmp_path}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    assert summary["steps"] == 4 and {"prm@1", "prm@32", "majority@32"} <= set(summary["test"])


@pytest.mark.slow
def test_lm_pretrained_runs_offline_from_the_cli(tmp_path):
    pytest.importorskip("gguf", reason="needs the [lm] extra")
    pytest.importorskip("gensim", reason="needs the [lm] extra")
    from tests.helpers import cli, read_summary

    proc = cli(
        "experiment=lm_pretrained",
        "trainer.steps=4",
        "trainer.batch_size=6",
        "trainer.eval_every=2",
        "data.per_domain=16",
        "data.test_size=8",
        "data.meta_size=8",
        f"hydra.run.dir={tmp_path}",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    assert summary["steps"] == 4 and summary["test"]["perplexity"] > 1


def test_prm_text_solutions_and_labels_mean_what_they_say():
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from bilevel_experiments.prm_text.builders import (
        exact_labels,
        mc_labels,
        prm_text,
        sample_problems,
        write_solutions,
    )

    gen = torch.Generator().manual_seed(0)
    for problem in sample_problems(200, gen):
        for solution in write_solutions(problem, 8, 0.2, gen, trap_rate=0.5):
            steps = solution["steps"]
            any_wrong = not all(right for *_, right in steps)
            assert solution["correct"] == (not any_wrong)  # wrong exactly when a step is wrong
            for start, op, a, result, _ in steps:  # each step's arithmetic holds
                assert result == (start + a if op == "+" else start - a)
            labels = mc_labels(problem, solution, 16, 0.2, 0.5, gen)
            exact = exact_labels(problem, solution, 0.2, 0.5)
            for lab, ex, (*_, right) in zip(labels, exact, steps):
                assert (lab == 0 and ex == 0) if not right else 0 <= lab <= 1
    data = prm_text(per_domain=40, test_problems=4, meta_problems=2, seed=0)
    errors = data.info["label_error"]
    assert errors["mc16"] < errors["mc2"] < errors["optimistic"]
    assert errors["mc16"] < errors["mislabeled"]
    # no domain's labels are the meta target (final-answer correctness of the whole solution)
    assert "outcome" not in data.names


def test_prm_text_refuses_a_max_len_that_cuts_steps():
    """A step past data.max_len was scored at the last token kept (a text without it) and
    trained against its label all the same, silently."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from bilevel_experiments.prm_text.builders import prm_text

    from bilevel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.max_len: 24 tokens cut the steps of \d+ sol"):
        prm_text(per_domain=8, test_problems=2, meta_problems=2, max_len=24, seed=0)


def test_lm_mixture_target_from_the_command_line_replaces_the_default():
    """The preset's target was a mapping, so data.target={copy:1} was refused with a
    misleading 'did you mean data.target' and +data.target.copy=1 merged into the default."""
    from bilevel_experiments.lm_mixture.builders import lm_mixture
    from hydra import compose, initialize_config_dir

    from bilevel.cli import config_dir
    from bilevel.errors import ConfigError

    def target(*overrides):
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=lm_mixture", *overrides])
        data = lm_mixture(per_domain=8, seq_len=8, target=cfg.data.target, meta_size=8)
        return {k: v for k, v in data.info["target"].items() if v}

    assert target() == {"markov_a": 0.5, "arithmetic": 0.5}
    assert target("data.target={copy:1}") == {"copy": 1.0}
    assert target("data.target={markov_a:3,copy:1}") == {"markov_a": 0.75, "copy": 0.25}
    assert target("data.target=copy") == {"copy": 1.0}
    for bad in ("[copy]", "{copy:abc}"):
        with pytest.raises(ConfigError, match="data.target"):
            target(f"data.target={bad}")


@pytest.mark.slow
def test_lm_pretrained_on_files_reads_the_study_text_and_trains(tmp_path):
    """The file-based study: the domains written as jsonl are read back as exactly their
    documents, tokenized by SmolLM2's tokenizer and packed; and a few steps train from the
    command line, as in memory."""
    pytest.importorskip("gguf", reason="needs the [lm] extra")
    pytest.importorskip("gensim", reason="needs the [lm] extra")
    from collections import Counter

    import torch
    from bilevel_experiments.lm_pretrained.builders import DOMAINS
    from bilevel_experiments.lm_pretrained.files import lm_pretrained_files

    from bilevel.data.corpus import load_tokenizer
    from bilevel.data.corpus.packing import pack
    from tests.helpers import cli, read_summary

    data = lm_pretrained_files(per_domain=12, seq_len=16, root=str(tmp_path / "corpus"))
    assert data.names == list(DOMAINS) and data.hf_inputs
    tok = load_tokenizer(str(tmp_path / "corpus" / "tokenizer"))
    sampler = data.train_sampler(6, 6, "uniform", 0, 0, 1, 1.0, torch.device("cpu"))
    for k, name in enumerate(DOMAINS):
        lines = (tmp_path / "corpus" / f"{name}.jsonl").read_text().splitlines()
        ids, docs = [], []
        for line in lines:  # the documents the cap of 12 x 17 tokens keeps
            if sum(len(d) + 1 for d in ids) >= 12 * 17:
                break
            ids.append(tok.encode([json.loads(line)["text"]])[0])
            docs.append(line)
        expected = Counter(map(tuple, pack(ids, tok.eod_id, 17).sequences.tolist()))
        n = sum(expected.values())
        taken = sampler.streams[k].take(n, list(range(n)), sampler._wait)
        assert Counter(tuple(s.tolist()) for s in taken) == expected, name
    sampler.close()
    proc = cli(
        "experiment=lm_pretrained_files",
        "trainer.steps=4",
        "trainer.batch_size=6",
        "trainer.eval_every=2",
        "data.per_domain=16",
        "data.test_size=8",
        "data.meta_size=8",
        f"data.root={tmp_path / 'corpus'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(tmp_path / "run")
    assert summary["steps"] == 4 and summary["test"]["perplexity"] > 1
    assert sum(summary["tokens_seen"].values()) == 4 * 6 * 32  # steps x rows x data.seq_len
