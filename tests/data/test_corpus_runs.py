"""Runs on corpora on disk, from the command line: each source trains and records what it read,
a run killed mid-corpus resumes bit-identical, and bad input is one line with exit 2 and no run
folder left behind."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bilevel.logging import read_jsonl
from tests.data.corpus_files import cli_args, corpus, documents, write_jsonl, write_tokens
from tests.helpers import REPO, cli, cli_batch, read_summary

SHORT = ["trainer.steps=30", "trainer.batch_size=12", "trainer.log_every=10", "seed=1"]


def _tokens_args(root):
    rng = np.random.default_rng(0)
    write_tokens(root / "tok" / "a.bin", rng.integers(0, 60, 4000))
    write_tokens(root / "tok" / "b.bin", rng.integers(60, 120, 6000))
    write_tokens(root / "tok" / "m.bin", rng.integers(0, 120, 2000))
    return [
        "data=tokens",
        f"data.domains.a={root / 'tok' / 'a.bin'}",
        f"data.domains.b={root / 'tok' / 'b.bin'}",
        f"data.meta={root / 'tok' / 'm.bin'}",
        "data.vocab_size=120",
        "data.seq_len=16",
        "data.meta_size=8",
    ]


def _hf_args(root, streaming):
    from datasets import Dataset

    for name, seed in (("x", 1), ("y", 2), ("meta", 3)):
        Dataset.from_dict({"text": documents(seed, 120)}).save_to_disk(str(root / "hf" / name))
    return [
        "data=hf",
        f"data.domains.x={root / 'hf' / 'x'}",
        f"data.domains.y={root / 'hf' / 'y'}",
        f"data.meta={root / 'hf' / 'meta'}",
        f"data.test={root / 'hf' / 'meta'}",
        f"data.streaming={'true' if streaming else 'false'}",
        "data.seq_len=16",
        "data.meta_size=8",
        "data.test_size=8",
    ]


@pytest.mark.parametrize("source", ["files", "tokens", "hf", "hf-streaming"])
def test_each_source_trains_and_records_what_it_read(run_cli, tmp_path, source):
    if source == "files":
        corpus(tmp_path)
        args = cli_args(tmp_path)
    elif source == "tokens":
        args = _tokens_args(tmp_path)
    else:
        args = _hf_args(tmp_path, streaming=source == "hf-streaming")
    summary, out = run_cli(*args, *SHORT)
    names = list(summary["weights"])
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0
    assert sum(summary["tokens_seen"].values()) == 30 * 12 * 16  # steps x rows x seq_len
    assert abs(sum(summary["mixture"].values()) - 1) < 1e-9
    assert set(summary["epochs"]) == set(names)
    if source != "tokens":
        assert sum(summary["documents_seen"].values()) > 0
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_seen" in r]
    assert [r["step"] for r in records] == [10, 20, 30]
    seen = [sum(r["tokens_seen"].values()) for r in records]
    assert seen == [10 * 12 * 16, 20 * 12 * 16, 30 * 12 * 16]  # cumulative
    if source in ("files", "hf"):
        assert "perplexity" in summary["test"]


def _slow_corpus(root):
    """A corpus and settings with which 120 steps take a few seconds (so a kill lands mid-run)."""
    corpus(root, per_domain=400)
    return [
        *cli_args(root),
        "data.block_bytes=2048",
        "model.d_model=128",
        "trainer.steps=120",
        "trainer.batch_size=24",
        "trainer.checkpoint_every=20",
        "trainer.log_every=20",
        "trainer.sampling=weights",
        "seed=2",
    ]


@pytest.mark.slow
def test_a_run_killed_mid_corpus_resumes_bit_identical(tmp_path):
    args = _slow_corpus(tmp_path)
    reference = tmp_path / "reference"
    proc = cli(*args, f"hydra.run.dir={reference}")
    assert proc.returncode == 0, proc.stderr
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-m", "bilevel", *args, f"hydra.run.dir={killed}"]
        + ["trainer.progress=false"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / "checkpoints" / "last.pt"

    def checkpoint_step():
        return torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else -1

    deadline = time.time() + 120
    while checkpoint_step() < 20 and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    step = checkpoint_step()
    assert 20 <= step < 120
    proc = cli(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = read_summary(killed), read_summary(reference)
    assert ours["weights"] == theirs["weights"]
    assert ours["tokens_seen"] == theirs["tokens_seen"]
    assert ours["documents_seen"] == theirs["documents_seen"]


def test_bad_corpora_are_one_line_exit_2_and_leave_no_run_folder(tmp_path):
    good = cli_args(tmp_path)
    corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    bad_json = write_jsonl(tmp_path / "bad" / "b.jsonl", documents(1, 10))
    lines = bad_json.read_text().splitlines()
    lines[3] = '{"text": "unterminated'
    bad_json.write_text("\n".join(lines) + "\n")
    no_field = write_jsonl(tmp_path / "nofield" / "n.jsonl", documents(1, 10), field="body")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    write_tokens(tmp_path / "big.bin", np.array([5, 9000, 3] * 100))
    write_tokens(tmp_path / "m.bin", np.arange(300) % 100)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(20))}), tmp_path / "ints.parquet")
    tokens = ["data=tokens", f"data.meta={tmp_path / 'm.bin'}", "data.vocab_size=100"]
    cases = [
        ([*good, f"data.domains.news={tmp_path / 'nothing' / '*.jsonl'}"], "matches no file"),
        ([*good, f"data.domains.news={tmp_path / 'empty' / '*.jsonl'}"], "is empty"),
        ([*good, f"data.domains.news={bad_json}"], "b.jsonl, line 4: is not JSON"),
        ([*good, f"data.domains.news={no_field}"], "has no text field 'text'"),
        ([*good, f"data.domains.news={tmp_path / 'ints.parquet'}"], "is int64, not text"),
        ([*good, "data.tokenizer=/no/such/tokenizer"], "cannot load tokenizer"),
        ([*good, "data.seq_len=0"], "data.seq_len: must be an integer >= 1"),
        ([*good, "data.rank_reads=some"], "data.rank_reads: must be own_blocks, all or lanes"),
        ([*tokens, f"data.domains.a={tmp_path / 'odd.bin'}"], "not a multiple of 2"),
        ([*tokens, f"data.domains.a={tmp_path / 'big.bin'}"], "holds token id 9000"),
        (["data=files", f"data.meta={tmp_path / 'm.bin'}"], "data.domains: must map"),
    ]
    runs = tmp_path / "runs"
    procs = cli_batch(
        [[*args, f"hydra.run.dir={runs / str(i)}"] for i, (args, _) in enumerate(cases)]
    )
    for (args, said), proc in zip(cases, procs, strict=True):
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2, (args[-1], proc.stderr[-2000:])
        assert len(lines) == 1 and said in lines[0], (said, proc.stderr[-2000:])
    assert not runs.exists() or not any(runs.iterdir())


def test_a_bad_row_found_mid_run_stops_with_one_line_and_skip_bad_rows_counts_it(tmp_path):
    corpus(tmp_path, per_domain=60)  # news: 30 documents a file, read 3 times over in the run
    path = tmp_path / "news" / "b.jsonl"
    lines = path.read_text().splitlines()
    lines[-5] = "not json at all"
    path.write_text("\n".join(lines) + "\n")
    args = [*cli_args(tmp_path), "data.block_bytes=2048", *SHORT, "trainer.steps=400"]
    proc = cli(*args, f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 2
    assert "b.jsonl, line 26: is not JSON" in proc.stderr.strip().splitlines()[-1]
    proc = cli(*args, "data.skip_bad_rows=true", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["bad_rows"]["news"] == 1
