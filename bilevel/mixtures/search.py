"""Propose mixtures, fit a regression from mixture to target, predict, and search: RegMix's
method (Liu et al., ICLR 2025) and the data mixing law's, in four functions.

    mixtures = propose(["web", "code", "books"], n=64, seed=0)      # [64, 3] shares
    ...train a small proxy on each, with its weights fixed...
    fit = fit_mixtures(mixtures, losses, "val_loss", ["web", "code", "books"], "lightgbm")
    fit.cv                      # k-fold Spearman and MAE of each model
    best, value = search(fit, samples=100_000, top=100)             # the mean of the top 100
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bilevel.errors import ConfigError
from bilevel.mixtures.regressors import MODELS, make

__all__ = [
    "FLOOR",
    "FORMAT",
    "MixtureFit",
    "cross_validate",
    "fit_mixtures",
    "floored",
    "load_fit",
    "propose",
    "search",
    "spearman",
]

FORMAT = {"format": "bilevel-mix fit", "version": 1}


def propose(
    domains: list[str],
    n: int,
    prior: np.ndarray | None = None,
    seed: int = 0,
    spread: tuple[float, float] = (0.05, 5.0),
) -> np.ndarray:
    """``n`` random mixtures ``[n, K]``, Dirichlet around ``prior`` (default uniform): row i
    has concentration ``K * prior * s_i`` with s_i log-uniform in ``spread``, so the small s
    give near-single-domain mixtures and the large ones mixtures near the prior (RegMix draws
    around the token shares with a varied concentration for the same reason: the regression
    must see the corners of the simplex to rank the mixtures between them)."""
    k = len(domains)
    if k < 2:
        raise ConfigError("--domains", f"needs at least 2 domains, got {domains}")
    if len(set(domains)) != k:
        raise ConfigError("--domains", f"names must differ, got {domains}")
    if n < 1:
        raise ConfigError("--n", f"must be >= 1, got {n}")
    prior = np.full(k, 1 / k) if prior is None else np.asarray(prior, dtype=float)
    if prior.shape != (k,) or not np.all(np.isfinite(prior)) or np.any(prior <= 0):
        raise ConfigError("--prior", f"needs {k} positive numbers, got {prior.tolist()}")
    prior = prior / prior.sum()
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(math.log(spread[0]), math.log(spread[1]), size=n))
    alpha = k * prior[None, :] * scale[:, None]
    out = rng.gamma(alpha)
    out[out.sum(1) == 0] = prior  # every gamma draw underflowed: the prior itself
    return floored(out / out.sum(1, keepdims=True))


FLOOR = 1e-6
"""The smallest share a proposed or searched mixture holds: softmax weights (``weights.init``)
cannot be exactly 0, and a share of 1e-6 draws a row of that domain once in a million."""


def floored(mixtures: np.ndarray) -> np.ndarray:
    """Shares raised to at least :data:`FLOOR`, rows summing to 1 again."""
    out = np.maximum(np.asarray(mixtures, dtype=float), FLOOR)
    return out / out.sum(-1, keepdims=True)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):  # ties: their mean rank
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2
            start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their mean rank); ``nan`` for a constant input."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def cross_validate(
    model: str, x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """k-fold cross-validation: every run predicted by a fit on the other folds; the pooled
    out-of-fold Spearman and mean absolute error."""
    n = len(y)
    if n < 2 * folds:
        raise ConfigError(
            "--folds",
            f"{folds}-fold cross-validation needs at least {2 * folds} runs (2 a fold), got "
            f"{n}: run more proxies or lower --folds (>= 2)",
        )
    order = np.random.default_rng(seed).permutation(n)
    predicted = np.empty(n)
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        predicted[part] = make(model, seed).fit(x[train], y[train]).predict(x[part])
    return {
        "spearman": spearman(predicted, y),
        "mae": float(np.abs(predicted - y).mean()),
        "folds": folds,
    }


@dataclass
class MixtureFit:
    """A regression from mixtures of ``domains`` to ``target``, with how it cross-validated."""

    domains: list[str]
    target: str
    model: str
    regressor: Any
    runs: int
    cv: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the fitted runs' mean share per domain: where search draws around by default
    prior: list[float] = field(default_factory=list)
    #: the smallest and largest target among the fitted runs: a prediction outside is an
    #: extrapolation (boosted trees and the law both make them), to be trusted less
    observed: list[float] = field(default_factory=list)

    def extrapolates(self, value: float) -> str | None:
        """A line saying how far ``value`` lies outside the fitted runs' targets, or ``None``."""
        if len(self.observed) != 2 or self.observed[0] <= value <= self.observed[1]:
            return None
        low, high = self.observed
        return (
            f"the predicted {self.target} {value:.6g} lies outside the {self.runs} fitted runs' "
            f"[{low:.6g}, {high:.6g}]: an extrapolation of the {self.model} fit; train the "
            "mixture (or proxies near it) before trusting the number"
        )

    def predict(self, mixtures: np.ndarray) -> np.ndarray:
        return self.regressor.predict(np.asarray(mixtures, dtype=float))

    def save(self, path: str | Path) -> Path:
        """One JSON file: the format and version, the domains, target, model, its parameters
        (LightGBM's as its own text model), the runs it saw and the cross-validation."""
        from bilevel.files import write_text_atomic

        data = {
            **FORMAT,
            "domains": self.domains,
            "target": self.target,
            "model": self.model,
            "runs": self.runs,
            "cv": self.cv,
            "prior": self.prior,
            "observed": self.observed,
            "parameters": self.regressor.to_json(),
        }
        return write_text_atomic(Path(path), json.dumps(data, indent=1) + "\n")


def load_fit(path: str | Path) -> MixtureFit:
    """A fit :meth:`MixtureFit.save` wrote; another file, or a fit of another format version,
    is one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--fit", f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            "--fit", f"{path}: not a fit written by bilevel-mix fit ({err})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT["format"]:
        raise ConfigError("--fit", f"{path}: not a fit written by bilevel-mix fit")
    if data.get("version") != FORMAT["version"]:
        raise ConfigError(
            "--fit",
            f"{path}: a fit of format version {data.get('version')}; this bilevel reads "
            f"version {FORMAT['version']}: fit again with this version",
        )
    model = data.get("model")
    if model not in MODELS:
        raise ConfigError("--fit", f"{path}: unknown model {model!r}")
    return MixtureFit(
        domains=list(data["domains"]),
        target=data["target"],
        model=model,
        regressor=MODELS[model].from_json(data["parameters"]),
        runs=int(data["runs"]),
        cv=data.get("cv", {}),
        prior=list(data.get("prior", [])),
        observed=[float(v) for v in data.get("observed", [])],
    )


def fit_mixtures(
    x: np.ndarray,
    y: np.ndarray,
    target: str,
    domains: list[str],
    model: str = "lightgbm",
    folds: int = 5,
    seed: int = 0,
    compare: list[str] | None = None,
) -> MixtureFit:
    """Fit ``model`` on all runs; cross-validate it and each model of ``compare`` first."""
    models = [model, *[m for m in (compare or []) if m != model]]
    cv = {m: cross_validate(m, x, y, folds, seed) for m in models}
    regressor = make(model, seed).fit(x, y)
    return MixtureFit(
        domains=list(domains),
        target=target,
        model=model,
        regressor=regressor,
        runs=len(y),
        cv=cv,
        prior=[float(v) for v in x.mean(0)],
        observed=[float(np.min(y)), float(np.max(y))],
    )


def search(
    fit: MixtureFit,
    samples: int = 100_000,
    top: int = 100,
    maximize: bool = False,
    seed: int = 0,
    prior: np.ndarray | None = None,
    chunk: int = 100_000,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Simulate ``samples`` mixtures around ``prior`` (default: the fitted runs' mean shares),
    keep the ``top`` the fit predicts best, and return their mean (RegMix's averaging: steadier
    than the single best point of a regression), its predicted target, and the top mixtures'
    predictions."""
    if samples < 1 or not 1 <= top <= samples:
        raise ConfigError("--top", f"must lie in [1, --samples={samples}], got {top}")
    if prior is None and fit.prior:
        prior = np.asarray(fit.prior, dtype=float)
    best_x, best_y = None, None
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        x = propose(fit.domains, n, prior, seed + done)
        y = fit.predict(x)
        if best_x is not None:
            x, y = np.concatenate([best_x, x]), np.concatenate([best_y, y])
        keep = np.argsort(-y if maximize else y, kind="stable")[:top]
        best_x, best_y = x[keep], y[keep]
        done += n
    mixture = floored(best_x.mean(0))
    return mixture, float(fit.predict(mixture[None])[0]), best_y
