"""Runs that depend on how batches are drawn: small domains are never starved, the Hessian from
another batch."""

import pytest

from bilevel.logging import read_jsonl


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


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_trainer_runs_with_an_independent_hessian_batch(run_cli, solver):
    summary, _ = run_cli("experiment=tiny", f"solver={solver}", "trainer.hessian_batch=independent")
    assert summary["skipped_steps"] == 0
