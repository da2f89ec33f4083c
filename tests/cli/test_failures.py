"""Failures that are not bad input: a full disk, out of memory, a builder that returns the wrong
thing."""

import subprocess
import sys

import pytest
import torch

from bilevel.data import DomainData, noisy_domains
from tests.helpers import REPO, cli, cli_batch, read_summary


def test_data_builder_must_return_domain_data():
    with pytest.raises(Exception, match="no training examples"):
        d = noisy_domains(per_domain=4, meta_size=4, test_size=4)
        DomainData(d.names, {k: v[:4] for k, v in d.train.items()}, d.meta).validate()


FULL_DISK = """
import errno, sys, torch
from bilevel import cli

real_save, calls = torch.save, []

def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk part-way
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["bilevel-run", *sys.argv[1:]]
cli.main()
"""


def test_a_full_disk_is_one_line_and_the_run_resumes_from_its_last_checkpoint(tmp_path):
    """A write that failed (disk full, quota) ended in a traceback wall from deep inside
    torch.save. It is one line naming the file, exit 1; the checkpoint keeps its previous
    version, and the run continues from it to the same end as a run never interrupted."""
    out = tmp_path / "run"
    args = ["experiment=tiny", "trainer.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"bilevel: error: cannot write {out / 'checkpoints' / 'last.pt'}: No space left on "
        f"device; the run's files keep their last complete versions: free space (or fix the "
        f"folder), then continue with resume={out}"
    ]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]  # no temp file
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    resumed, straight = cli_batch(
        [[f"resume={out}"], [*args, f"hydra.run.dir={tmp_path / 'straight'}"]]
    )
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr
    assert read_summary(out)["weights"] == read_summary(tmp_path / "straight")["weights"]


OOM_MODEL = """
import torch
from bilevel.models import MLP


class NarrowOOM(MLP):
    \"\"\"An MLP that runs out of memory at its 30th forward pass when 8 units wide.\"\"\"

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 30 and self.net[0].out_features == 8:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                "79.11 GiB of which 1.20 GiB is free."
            )
        return super().forward(x)
"""


def test_out_of_memory_is_one_line_and_a_sweep_goes_on(tmp_path):
    """Running out of memory (the commonest end of a run on a GPU) was a traceback; it is one
    line with torch's own first sentence and what shrinks this library's footprint, exit 1. In a
    sweep it ends only the job whose sizes did not fit."""
    (tmp_path / "oom_model.py").write_text(OOM_MODEL)
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "experiment=tiny",
        "model._target_=oom_model.NarrowOOM",
        "model.hidden=[16],[8]",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr
    line = (
        "bilevel: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower "
        "trainer.batch_size (or set trainer.meta_batch_size), use solver.products="
        "finite_difference (no kept double-backward graph), trainer.strategy=fsdp under "
        "torchrun (shards the model)"
    )
    assert line in proc.stderr.splitlines() and "Traceback" not in proc.stderr
    assert read_summary(sweep / "0")["steps"] == 40  # the job that fitted finished
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and ",error," in rows[2] and "out of memory" in rows[2]
