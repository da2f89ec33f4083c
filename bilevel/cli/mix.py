"""``bilevel-mix``: offline mixture search in four verbs (see :mod:`bilevel.mixtures`).

    bilevel-mix propose --domains web,code,books --n 64 --out mixtures.csv
    bilevel-run -m experiment=... trainer.learn_weights=false trainer.sampling=weights \\
        'weights.init=from:mixtures.csv:${mixture_id}' '+mixture_id=range(0,64)'
    bilevel-mix fit --mixtures runs/multirun/<date>/<time> --target val_loss --out fit.json
    bilevel-mix predict --fit fit.json --mixtures candidates.csv --out predicted.csv
    bilevel-mix search --fit fit.json --out mixture.yaml
    bilevel-run experiment=... weights.init=from:mixture.yaml trainer.learn_weights=false \\
        trainer.sampling=weights    # or without it: the mixture as loss weights

Bad input is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bilevel.errors import ConfigError, WriteError
from bilevel.files import write_text_atomic
from bilevel.mixtures import (
    MODELS,
    fit_mixtures,
    join,
    load_fit,
    propose,
    read_metrics,
    read_mixtures,
    search,
    write_table,
)

__all__ = ["main"]


def _names(text: str, key: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(key, f"needs comma-separated names, got {text!r}")
    return names


def _numbers(text: str, key: str, count: int) -> np.ndarray:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(key, f"needs {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise ConfigError(key, f"needs {count} numbers (one per domain), got {len(values)}")
    return np.asarray(values)


def _propose(args: argparse.Namespace) -> None:
    domains = _names(args.domains, "--domains")
    prior = None
    if args.prior == "sizes":
        if not args.sizes:
            raise ConfigError(
                "--sizes",
                "--prior sizes needs each domain's size (tokens or rows), e.g. --sizes 4e9,1e9,2e8",
            )
        prior = _numbers(args.sizes, "--sizes", len(domains))
    elif args.prior != "uniform":
        prior = _numbers(args.prior, "--prior", len(domains))
    mixtures = propose(domains, args.n, prior, args.seed)
    out = write_table(args.out, [str(i) for i in range(args.n)], domains, mixtures)
    print(f"wrote {args.n} mixtures of {', '.join(domains)} to {out}")
    print(
        "train a fixed-weight proxy on each (one sweep; add your experiment and a short "
        "trainer.steps):\n"
        f"  bilevel-run -m trainer.learn_weights=false trainer.sampling=weights "
        f"'weights.init=from:{out}:${{mixture_id}}' '+mixture_id=range(0,{args.n})'\n"
        "then: bilevel-mix fit --mixtures <the sweep folder> --target <metric> --out fit.json"
    )


def _fit(args: argparse.Namespace) -> None:
    mixtures = read_mixtures(args.mixtures)
    metrics_path = args.metrics or (args.mixtures if Path(args.mixtures).is_dir() else None)
    if metrics_path is None:
        raise ConfigError("--metrics", "needed unless --mixtures is a sweep folder")
    metrics = read_metrics(metrics_path)
    ids, x, y = join(mixtures, metrics, args.target)
    compare = [m.strip() for m in args.compare.split(",") if m.strip()] if args.compare else []
    for name in [args.model, *compare]:
        if name not in MODELS:
            raise ConfigError("--model", f"must be one of {', '.join(MODELS)}, got {name!r}")
    fit = fit_mixtures(
        x, y, args.target, mixtures.columns, args.model, args.folds, args.seed, compare
    )
    path = fit.save(args.out)
    print(f"{len(ids)} runs, {len(mixtures.columns)} domains, target {args.target}")
    print(f"{args.folds}-fold cross-validation (out-of-fold predictions of all runs):")
    print("model     Spearman  MAE")
    for name, cv in fit.cv.items():
        print(f"{name:<9} {cv['spearman']:>8.4f}  {cv['mae']:.4g}")
    print(f"saved the {args.model} fit on all {len(ids)} runs to {path}")


def _predict(args: argparse.Namespace) -> None:
    fit = load_fit(args.fit)
    table = read_mixtures(args.mixtures)
    missing = [d for d in fit.domains if d not in table.columns]
    extra = [c for c in table.columns if c not in fit.domains]
    if missing or extra:
        raise ConfigError(
            "--mixtures",
            f"its domains {table.columns} are not the fit's {fit.domains}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (not in the fit: {', '.join(extra)})" if extra else ""),
        )
    x = table.values[:, [table.columns.index(d) for d in fit.domains]]
    predicted = fit.predict(x)
    out = write_table(args.out, table.ids, [fit.target], predicted[:, None])
    print(f"predicted {fit.target} for {len(table.ids)} mixtures: {out}")


def _search(args: argparse.Namespace) -> None:
    fit = load_fit(args.fit)
    mixture, value, tops = search(fit, args.samples, args.top, args.maximize, args.seed)
    best = "highest" if args.maximize else "lowest"
    shares = "\n".join(f"    {d}: {v:.6f}" for d, v in zip(fit.domains, mixture, strict=True))
    text = (
        f"# bilevel-mix search: the mean of the {args.top} mixtures with the {best} predicted "
        f"{fit.target}\n# among {args.samples} simulated ones ({fit.model} fit on {fit.runs} "
        f"runs). Train on it, batches drawn by it (as RegMix):\n#   bilevel-run ... "
        f"weights.init=from:{args.out} trainer.learn_weights=false trainer.sampling=weights\n"
        "# or as loss weights over uniformly drawn batches (no domain repeated more than the\n"
        "# others: the better choice when a favoured domain is small; docs: Offline or online?):\n"
        f"#   bilevel-run ... weights.init=from:{args.out} trainer.learn_weights=false\n"
        f"weights:\n  init:\n{shares}\n"
        f"predicted:\n  target: {fit.target}\n  value: {value:.6g}\n  model: {fit.model}\n"
        f"  top_range: [{float(tops.min()):.6g}, {float(tops.max()):.6g}]\n"
    )
    note = fit.extrapolates(value)
    if note:
        text += f"# note: {note}\n"
    write_text_atomic(Path(args.out), text)
    print(text, end="")
    print(f"written: {args.out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel-mix",
        description="Offline mixture search: propose mixtures for proxy runs, fit a regression "
        "from mixture to a target metric, predict, and search the best mixture.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("propose", help="random mixtures for fixed-weight proxy runs")
    p.add_argument("--domains", required=True, help="comma-separated domain names")
    p.add_argument("--n", type=int, default=64, help="how many mixtures (RegMix: 512)")
    p.add_argument(
        "--prior",
        default="uniform",
        help="where the mixtures center: uniform, sizes (with --sizes), or K shares",
    )
    p.add_argument("--sizes", help="each domain's size (tokens or rows), for --prior sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mixtures.csv")
    p.set_defaults(run=_propose)
    f = verbs.add_parser("fit", help="fit a regression from mixture to a target metric")
    f.add_argument("--mixtures", required=True, help="a CSV (id, one share per domain) or a sweep")
    f.add_argument("--metrics", help="a CSV (id, metrics); default: the sweep's results.csv")
    f.add_argument("--target", required=True, help="the metric column to predict")
    f.add_argument("--model", default="lightgbm", help="lightgbm | linear | law (the saved fit)")
    f.add_argument("--compare", default="", help="more models to cross-validate, e.g. linear,law")
    f.add_argument("--folds", type=int, default=5)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default="fit.json")
    f.set_defaults(run=_fit)
    r = verbs.add_parser("predict", help="predict the target of mixtures")
    r.add_argument("--fit", required=True)
    r.add_argument("--mixtures", required=True)
    r.add_argument("--out", default="predicted.csv")
    r.set_defaults(run=_predict)
    s = verbs.add_parser("search", help="the best mixture by the fit (mean of the top ones)")
    s.add_argument("--fit", required=True)
    s.add_argument("--samples", type=int, default=100_000)
    s.add_argument("--top", type=int, default=100)
    s.add_argument("--maximize", action="store_true", help="the target is better higher")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="mixture.yaml")
    s.set_defaults(run=_search)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as err:
        print(f"bilevel-mix: error: {err}", file=sys.stderr)
        sys.exit(2)
    except WriteError as err:
        print(f"bilevel-mix: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
