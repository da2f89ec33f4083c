"""Paired differences between a study's methods and a baseline, seed by seed.

Two methods run on the same seed share their data, their model's initialization and their
batches' randomness up to the point where they differ, so the difference of their metrics on
that seed is far less noisy than either metric: seed-to-seed spread (± 1.8 perplexity in
``lm_pretrained``) hides a gain that every seed shows. The table reports, per method and
metric, the mean difference to the baseline over the seeds both have, its 95% confidence
interval (Student's t with n - 1 degrees of freedom), how many seeds the method won, and the
per-seed differences themselves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["paired", "paired_table", "t_quantile"]


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.5 + level / 2, df))
    except ImportError:  # the normal quantile: too narrow for a few seeds, so said below
        return 1.959964


def paired(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    method: str,
    baseline: str,
    metric: str,
) -> dict[str, Any] | None:
    """``method - baseline`` on ``metric`` (a test metric, or ``meta_loss``) over the seeds
    both ran: ``{"diffs": {seed: d}, "mean", "low", "high", "n"}``; ``None`` without a shared
    seed."""

    def by_seed(label: str) -> dict[int, float]:
        out = {}
        for run in results.get(label, []):
            value = run["test"].get(metric) if metric != "meta_loss" else run.get("meta_loss")
            if isinstance(value, int | float) and math.isfinite(value):
                out[int(run["seed"])] = float(value)
        return out

    a, b = by_seed(method), by_seed(baseline)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = {s: a[s] - b[s] for s in seeds}
    values = list(diffs.values())
    mean = statistics.fmean(values)
    if len(values) > 1:
        half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    else:
        half = math.inf
    return {"diffs": diffs, "mean": mean, "low": mean - half, "high": mean + half, "n": len(seeds)}


def paired_table(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    baselines: Sequence[str],
    metrics: Sequence[str],
    higher_is_better: Mapping[str, bool],
) -> str:
    """A markdown table of every other method against each baseline on each metric."""
    lines = [
        "| method | − baseline | metric | mean difference | 95% interval | seeds better "
        "| per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, baseline in enumerate(baselines):
        if baseline not in results:
            continue
        for method in results:
            # a baseline against an earlier one is that row's mirror image: shown once
            if method == baseline or method in baselines[:i]:
                continue
            for metric in metrics:
                found = paired(results, method, baseline, metric)
                if found is None:
                    continue
                up = higher_is_better.get(metric, False)
                better = sum((d > 0) if up else (d < 0) for d in found["diffs"].values())
                low, high = found["low"], found["high"]
                interval = f"[{low:+.4f}, {high:+.4f}]" if math.isfinite(low) else "(one seed)"
                seeds = " ".join(f"{d:+.4f}" for d in found["diffs"].values())
                lines.append(
                    f"| {method} | {baseline} | {metric} | {found['mean']:+.4f} | {interval} | "
                    f"{better}/{found['n']} | {seeds} |"
                )
    return "\n".join(lines)
