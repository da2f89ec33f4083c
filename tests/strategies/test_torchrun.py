"""Two CPU ranks under torchrun: the weights stay identical on every rank, and a failure is
the library's line in torchrun's own summary."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.data.corpus_files import cli_args, corpus, write_tokens
from tests.helpers import REPO, cli, read_summary, torchrun


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    out = tmp_path / "ddp"
    scratch = tmp_path / "tmp"  # the ranks' temporary folder: rank 1's Hydra folder goes there
    scratch.mkdir()
    torchrun(
        "experiment=noisy_domains",
        "trainer.steps=40",
        "device=cpu",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
        env={"TMPDIR": str(scratch)},
    )
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert summary["steps"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "tmp"]  # rank 1: nothing here
    assert not list(scratch.glob("bilevel-rank*"))  # and its temporary folder is gone


@pytest.mark.parametrize("solver", ["scalebio", "odm"])
def test_methods_of_their_own_rule_keep_the_weights_equal_on_every_rank(tmp_path, solver):
    """ScaleBiO's penalty gradient and ODM's reward estimates came from each rank's own
    batches: the weights drifted apart between ranks (summary's ranks_agree false, exit 0)."""
    torchrun(
        "experiment=tiny", f"solver={solver}", "trainer.progress=false", f"hydra.run.dir={tmp_path}"
    )
    summary = read_summary(tmp_path)
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True


LOCAL_METHOD = """
import torch
import torch.distributed as dist
from bilevel.methods.base import OuterUpdate


class PerRank:  # a user's method with a bug: each rank sets its own weights
    name, uses_meta, uses_outer_optimizer = "per_rank", False, False

    def setup(self, loop):
        return []

    def window(self, loop, n, update):
        for _ in range(n):
            loop.inner_step(loop.next_batch())
        if not update:
            return None
        scores = torch.arange(len(loop.w), dtype=loop.w.dtype) * (1.0 + dist.get_rank())
        return OuterUpdate(values=torch.softmax(scores, 0))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
"""


def test_weights_that_drift_apart_between_ranks_are_said_at_the_first_log_event(tmp_path):
    (tmp_path / "per_rank.py").write_text(LOCAL_METHOD)
    out = tmp_path / "run"
    torchrun(
        "experiment=tiny",
        "solver=custom",
        "solver._target_=per_rank.PerRank",
        "trainer.log_every=10",
        "trainer.progress=false",
        f"hydra.run.dir={out}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    summary = read_summary(out)
    assert summary["ranks_agree"] is False
    assert [n for n in summary["notes"] if "differ between ranks at step 10" in n]


@pytest.mark.distributed
def test_a_bad_input_under_torchrun_is_our_line_in_torchruns_summary():
    """torchrun ends a failed job with its own traceback and a summary of each rank's failure;
    the summary shows the library's line (from the rank's error file) and its exit code 2,
    where it said "To enable traceback see ..."."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "bilevel",
            "experiment=tiny",
            "solver=cg",
            "solver.iters=-1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    line = "bilevel: error: solver (bilevel.solvers.build): cg: iters must be an integer >= 1"
    summary = proc.stderr.split("ChildFailedError", 1)[-1]
    assert summary.count(f"traceback : {line}") == 2, proc.stderr[-3000:]
    # the first rank to fail exits 2; torchrun then stops the other, which may be caught after
    # it wrote its error file but before its own exit (SIGTERM, -15) on a loaded machine
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", summary)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, summary
    assert "To enable traceback" not in summary


def _one_and_two_ranks(tmp_path, *args):
    """The same run in one process and on two ranks; their summaries."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = cli(*args, f"hydra.run.dir={one}")
    assert proc.returncode == 0, proc.stderr
    torchrun(*args, "trainer.progress=false", f"hydra.run.dir={two}")
    return read_summary(one), read_summary(two)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_train_on_the_rows_one_process_would(tmp_path):
    """Every rank draws the global batch and keeps its share: the same seed gives the same
    global batches at any world size (before, each rank drew its own rows, and 2 ranks ended
    6e-3 from one process)."""
    one, two = _one_and_two_ranks(tmp_path, "experiment=tiny", "trainer.steps=100")
    assert two["world_size"] == 2 and two["ranks_agree"]
    for name, value in one["weights"].items():
        assert abs(value - two["weights"][name]) < 1e-5


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("reads", ["tokens", "files-all", "files-own", "files-lanes"])
def test_corpora_on_two_ranks(tmp_path, reads):
    """Token windows, and text read with data.rank_reads=all or lanes: the rows of one
    process. Text read with own_blocks (the default): disjoint reads, the same global
    composition and token counts, other rows (packing is sequential within each rank's
    blocks)."""
    if reads == "tokens":
        rng = np.random.default_rng(0)
        write_tokens(tmp_path / "a.bin", rng.integers(0, 60, 4000))
        write_tokens(tmp_path / "b.bin", rng.integers(60, 120, 6000))
        write_tokens(tmp_path / "m.bin", rng.integers(0, 120, 2000))
        args = [
            "data=tokens",
            f"data.domains.a={tmp_path / 'a.bin'}",
            f"data.domains.b={tmp_path / 'b.bin'}",
            f"data.meta={tmp_path / 'm.bin'}",
            "data.vocab_size=120",
        ]
    else:
        corpus(tmp_path)
        args = [*cli_args(tmp_path), "data.block_bytes=4096"]
        args += ["data.rank_reads=all"] if reads == "files-all" else []
        # news has 9 blocks of 4 KiB, noise 4: two lanes each (code, 2 blocks, reads all)
        args += ["data.rank_reads=lanes", "data.lanes=2"] if reads == "files-lanes" else []
    common = [*args, "data.seq_len=16", "data.meta_size=16", "trainer.steps=40"]
    common += ["trainer.batch_size=16", "trainer.log_every=10", "trainer.sampling=weights"]
    one, two = _one_and_two_ranks(tmp_path, *common)
    assert two["ranks_agree"]
    total = sum(one["tokens_seen"].values())
    assert total == sum(two["tokens_seen"].values()) == 40 * 16 * 16  # summed over the ranks
    gap = max(abs(v - two["weights"][k]) for k, v in one["weights"].items())
    if reads == "files-own":  # other rows, so other weights and, by them, other shares
        assert 0 < gap < 0.05
    else:
        assert gap < 1e-5
        assert one["tokens_seen"] == two["tokens_seen"]
