"""Does a lower meta loss mean a better verifier? Read the study's results and say.

    python -m bilevel_experiments.prm_text.analysis [experiments/prm_text/results.json]

DreamPRM's upper level is the aggregation MSE on the meta set; what the study reports is
best-of-N accuracy on the test set. The outer loop can only move what it measures, so this
prints, from the runs of the table:

- how far each method's verifier is above random choice (best-of-16 minus random's, per seed);
- within each seed, the rank correlation (Spearman) between the runs' meta loss and their mean
  best-of-N accuracy (N = 4, 16, 32) across the methods: a negative value means that a lower meta
  loss went with a better ranking (what the upper level assumes).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
BEST_OF = ("prm@4", "prm@16", "prm@32")


def best_of_n(run: dict) -> float:
    """The mean of a run's best-of-N accuracies over N = 4, 16, 32."""
    return statistics.fmean(run["test"][k] for k in BEST_OF)


def main(path: Path) -> None:
    results = json.loads(path.read_text())
    print("best-of-16 above random choice (mean over seeds; per seed):")
    for method, runs in results.items():
        gaps = [r["test"]["prm@16"] - r["test"]["random@16"] for r in runs]
        per_seed = " ".join(f"{g:+.3f}" for g in gaps)
        print(f"  {method}: {statistics.fmean(gaps):+.3f} ({per_seed})")
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for runs in results.values():
        for r in runs:
            by_seed.setdefault(r["seed"], []).append((r["meta_loss"], best_of_n(r)))
    print("Spearman(meta loss, mean best-of-4/16/32) across the methods of a seed:")
    rhos = []
    for seed, pairs in sorted(by_seed.items()):
        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
        rhos.append(rho)
        print(f"  seed {seed}: {rho:+.2f} ({len(pairs)} runs)")
    print(f"  mean: {statistics.fmean(rhos):+.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json")
