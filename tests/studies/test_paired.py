"""The studies' paired differences: the mean, its t-interval and the rows of the table."""

import math

import pytest
from bilevel_experiments.paired import paired, paired_table, t_quantile


def _runs(values, metric="perplexity"):
    return [{"seed": s, "test": {metric: v}, "meta_loss": v / 10} for s, v in values.items()]


def test_the_difference_is_taken_seed_by_seed_over_the_seeds_both_ran():
    results = {
        "uniform": _runs({0: 80.0, 1: 82.0, 2: 78.0, 3: 90.0}),
        "learned": _runs({0: 78.0, 1: 81.0, 2: 77.5, 4: 70.0}),  # seed 3 / 4 only on one side
    }
    found = paired(results, "learned", "uniform", "perplexity")
    assert found["diffs"] == {0: -2.0, 1: -1.0, 2: -0.5} and found["n"] == 3
    mean = (-2.0 - 1.0 - 0.5) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in (-2.0, -1.0, -0.5)) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # Student's t, 2 degrees of freedom, 97.5%
    assert found["mean"] == pytest.approx(mean)
    assert (found["low"], found["high"]) == pytest.approx((mean - half, mean + half))
    assert paired(results, "learned", "uniform", "meta_loss")["mean"] == pytest.approx(mean / 10)
    assert paired(results, "learned", "nobody", "perplexity") is None


def test_one_seed_has_no_interval_and_the_quantile_is_students():
    results = {"a": _runs({0: 1.0}), "b": _runs({0: 2.0})}
    found = paired(results, "a", "b", "perplexity")
    assert found["mean"] == -1.0 and math.isinf(found["high"])
    assert t_quantile(4) == pytest.approx(2.776445105, rel=1e-6)


def test_the_table_counts_wins_by_direction_and_shows_each_pair_once():
    results = {
        "uniform": _runs({0: 10.0, 1: 10.0}),
        "temperature": _runs({0: 7.0, 1: 11.0}),
        "learned": _runs({0: 8.0, 1: 9.0}),
    }
    table = paired_table(results, ["uniform", "temperature"], ["perplexity"], {})
    rows = table.splitlines()[2:]
    # learned and temperature against uniform; learned against temperature; temperature against
    # uniform is not repeated as uniform against temperature
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| temperature", "uniform"],
        ["| learned", "uniform"],
        ["| learned", "temperature"],
    ]
    assert "| 2/2 |" in rows[1] and "| 1/2 |" in rows[2]
    higher = paired_table(results, ["uniform"], ["perplexity"], {"perplexity": True})
    assert "| 0/2 |" in higher.splitlines()[3]
