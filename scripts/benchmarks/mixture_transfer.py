"""Does a mixture regression fitted on small proxies rank larger models? (``bilevel-mix``)

Fits each model of :mod:`bilevel.mixtures` on one table of proxy runs (mixtures and metrics,
as ``bilevel-mix fit`` reads them), then, for every ``--check`` pair of tables (mixtures and
the metrics measured on *other* runs: larger models, other mixtures), compares the fit's
predictions with what was measured: the Spearman correlation, and where the mixture the fit
ranks first stands among the measured ones (1 = it is the best of them).

    python scripts/benchmarks/mixture_transfer.py \\
        --mixtures proxies_mix.csv --metrics proxies_loss.csv --target val_loss \\
        --check large_mix.csv:large_loss.csv

RegMix publishes such tables (512 proxies of 1M parameters; 256 models of 60M and 64 of 1B
on other mixtures) in its repository's ``data/`` folder; docs/mixtures.md reports this
script's figures on them. Nothing of them is shipped here: point the script at a copy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from bilevel.errors import ConfigError
from bilevel.mixtures import (
    MODELS,
    Table,
    fit_mixtures,
    join,
    read_metrics,
    read_mixtures,
    spearman,
)


def _checks(text: str) -> tuple[str, str]:
    mixtures, sep, metrics = text.partition(":")
    if not sep or not mixtures or not metrics:
        raise argparse.ArgumentTypeError(f"needs MIXTURES.csv:METRICS.csv, got {text!r}")
    return mixtures, metrics


def measured_rank(predicted: np.ndarray, measured: np.ndarray, maximize: bool) -> int:
    """Where the run the fit predicts best stands among the measured ones (1 = best)."""
    pick = int(np.argmax(predicted) if maximize else np.argmin(predicted))
    better = measured > measured[pick] if maximize else measured < measured[pick]
    return int(better.sum()) + 1


def _shared(mixtures: Table, metrics: Table, target: str):
    """:func:`join` over the ids both tables hold (a check table may lack a few runs'
    metrics, e.g. runs that failed)."""
    measured = set(metrics.ids)
    rows = [j for j, i in enumerate(mixtures.ids) if i in measured]
    kept = replace(mixtures, ids=[mixtures.ids[j] for j in rows], values=mixtures.values[rows])
    return join(kept, metrics, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixtures", required=True, help="the proxies' mixtures (CSV)")
    parser.add_argument("--metrics", required=True, help="the proxies' metrics (CSV)")
    parser.add_argument("--target", required=True, help="the metric column to predict")
    parser.add_argument(
        "--check",
        type=_checks,
        action="append",
        required=True,
        help="MIXTURES.csv:METRICS.csv of other runs to rank (repeatable)",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--maximize", action="store_true", help="the target is better higher")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        fit_table = read_mixtures(args.mixtures)
        _, x, y = join(fit_table, read_metrics(args.metrics), args.target)
        checks = []
        for mix_path, met_path in args.check:
            mixtures = read_mixtures(mix_path, "--check")
            if mixtures.columns != fit_table.columns:
                raise ConfigError("--check", f"{mix_path}: its domains differ from --mixtures'")
            _, cx, cy = _shared(mixtures, read_metrics(met_path, "--check"), args.target)
            checks.append((Path(mix_path).stem, cx, cy))
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        print(f"fitted on {len(y)} runs of {len(fit_table.columns)} domains; target {args.target}")
        head = "| model | CV Spearman |" + "".join(
            f" {p}: Spearman | {p}: rank of the pick |" for p, _, _ in checks
        )
        print(head)
        print("|" + "---|" * (2 + 2 * len(checks)))
        for model in models:
            fit = fit_mixtures(x, y, args.target, fit_table.columns, model, folds=args.folds)
            cells = [model, f"{fit.cv[model]['spearman']:.3f}"]
            for _, cx, cy in checks:
                predicted = fit.predict(cx)
                cells += [
                    f"{spearman(predicted, cy):.3f}",
                    f"{measured_rank(predicted, cy, args.maximize)} of {len(cy)}",
                ]
            print("| " + " | ".join(cells) + " |", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
