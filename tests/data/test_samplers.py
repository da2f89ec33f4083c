"""The sampler's guarantees: counts sum to the batch, are right in expectation, never starve a
domain with a share; ``size`` shuffles the union; everything reproducible from a checkpoint."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.data.samplers import DomainSampler, temperature_shares
from bilevel.functional import segment_mean


def columns(sizes):
    domain = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(sizes)])
    return {"x": torch.arange(len(domain), dtype=torch.float32)[:, None], "domain": domain}


def counts(batch, k):
    return torch.bincount(batch["domain"], minlength=k)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=9),
    batch=st.integers(1, 70),
    # shares: zero, or at least 1/20 of the largest raw value (so a run of a few thousand
    # batches must draw every domain that has one)
    raw=st.lists(st.one_of(st.just(0.0), st.floats(0.05, 1.0)), min_size=9, max_size=9),
    seed=st.integers(0, 10_000),
)
def test_systematic_counts_sum_to_the_batch_and_match_shares(sizes, batch, raw, seed):
    k = len(sizes)
    shares = torch.tensor(raw[:k], dtype=torch.float64)
    if shares.sum() == 0:
        shares[0] = 1.0
    shares = shares / shares.sum()
    sampler = DomainSampler(columns(sizes), k, batch, "weights", seed)
    expected = batch * shares
    # Enough batches that a domain drawn in a fraction b*s of the batches shows up for sure.
    smallest = min([float(e) for e in expected if e > 0])
    n = max(200, math.ceil(30 / smallest))
    total = torch.zeros(k, dtype=torch.float64)
    for _ in range(n):
        c = counts(sampler.next(shares), k).double()
        assert int(c.sum()) == batch
        # each count is floor or ceil of its expectation (systematic sampling)
        assert torch.all(c >= torch.floor(expected) - 1e-9) and torch.all(c <= torch.ceil(expected))
        total += c
    mean = total / n
    # the mean count is the expectation (within sampling noise: at most one row of spread)
    assert torch.all((mean - expected).abs() <= 4 * (0.25 / n) ** 0.5 + 1e-9), (mean, expected)
    # no domain with a share is starved over the run; a domain without one is never drawn
    assert torch.all((total > 0) == (shares > 0))


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_a_batch_smaller_than_k_still_draws_every_domain(batch):
    sampler = DomainSampler(columns([30, 30, 30, 30]), 4, batch, "uniform", seed=1)
    seen = torch.zeros(4)
    for _ in range(200):
        seen += counts(sampler.next(), 4)
    assert torch.all(seen > 0.8 * 200 * batch / 4)


def test_size_sampling_shuffles_the_union():
    sizes = [1000, 1000, 10]
    sampler = DomainSampler(columns(sizes), 3, 64, "size", seed=0)
    rows = []
    for _ in range(2010 // 64 * 3):
        batch = sampler.next()
        rows.append(batch["x"].flatten().long())
    rows = torch.cat(rows)
    first_epoch = rows[:2010]
    assert torch.equal(first_epoch.sort().values, torch.arange(2010))  # every row once per epoch
    small = (rows >= 2000).sum().item()
    assert small == pytest.approx(len(rows) * 10 / 2010, abs=3)


def test_size_normalizer_is_unbiased_for_each_domain_mean():
    # per-domain losses of a small domain from shuffled batches: sum / expected count averages
    # to its mean loss (a plain mean over present rows would count absent batches as 0)
    sizes = [300, 300, 6]
    data = columns(sizes)
    values = torch.cat([torch.full((300,), 1.0), torch.full((300,), 2.0), torch.full((6,), 5.0)])
    sampler = DomainSampler(data, 3, 32, "size", seed=0)
    total = torch.zeros(3)
    n = 2000
    for _ in range(n):
        batch = sampler.next()
        per_row = values[batch["x"].flatten().long()]
        total += segment_mean(per_row, batch["domain"], 3, sampler.inverse_counts)
    assert (total / n).tolist() == pytest.approx([1.0, 2.0, 5.0], rel=0.08)


def test_temperature_shares():
    assert temperature_shares([100, 25], 1.0) == pytest.approx([0.8, 0.2])
    assert temperature_shares([100, 25], 2.0) == pytest.approx([2 / 3, 1 / 3])
    sampler = DomainSampler(columns([100, 25]), 2, 30, "temperature", temperature=2.0)
    total = sum(counts(sampler.next(), 2) for _ in range(300))
    assert (total / 300).tolist() == pytest.approx([20.0, 10.0], abs=0.05)
    assert sampler.inverse_counts is None  # the sampler applies the mixture


@pytest.mark.parametrize("sampling", ["uniform", "size", "weights"])
def test_state_dict_restores_the_stream(sampling):
    data = columns([20, 7, 13])
    w = torch.tensor([0.5, 0.2, 0.3])
    a = DomainSampler(data, 3, 8, sampling, seed=4)
    for _ in range(5):
        a.next(w)
    state = a.state_dict()
    expected = [a.next(w)["x"] for _ in range(6)]
    b = DomainSampler(data, 3, 8, sampling, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next(w)["x"]) for x in expected)
