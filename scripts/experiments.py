"""Rerun a study over 3 seeds and regenerate its results table, plots and README section.

    python scripts/experiments.py digits          # experiments/digits/{results.md,*.png,README.md}
    python scripts/experiments.py lm_mixture
    python scripts/experiments.py prm
    python scripts/experiments.py digits --quick  # a few steps, one seed (smoke test)

Every run goes through the same code path as ``bilevel-run`` (Hydra compose + ``bilevel.cli.run``)
with the study's preset ``experiment=<study>`` plus the method's overrides; run directories go to
``experiments/<study>/runs/`` (``runs_quick/`` for ``--quick``; not versioned). Tables report mean
± std over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bilevel.cli import config_dir, quiet_third_parties, run
from bilevel.errors import ConfigError, check_seed
from bilevel.files import write_atomic, write_text_atomic
from bilevel.logging import read_jsonl
from bilevel.logging import run_dir as run_dirs
from bilevel.logging.provenance import machine_line

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = ["first_order", "unrolled", "neumann", "cg"]
SEEDS = [0, 1, 2]  # the seeds of a study's table; others make a partial rerun


@dataclass
class Method:
    label: str
    overrides: list[str] = field(default_factory=list)
    kind: str = "run"  # run | selection | best_single | selection_single | doremi | offline(_loss)


@dataclass
class Study:
    name: str
    methods: list[Method]
    metrics: list[str]  # test metrics in the table
    quick: list[str]  # overrides that make a run take seconds
    notes: str = ""
    plots: list[str] = field(default_factory=lambda: ["weights"])
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))  # the seeds of its table
    # paired differences (method - baseline, seed by seed) against these methods, on these
    # metrics (True: higher is better)
    paired_to: list[str] = field(default_factory=list)
    paired_metrics: dict[str, bool] = field(default_factory=dict)
    # overrides of every run that change how it computes, not what (a cache kept across the
    # runs; "{runs}" is the study's runs folder); --reuse compares runs without them
    shared: list[str] = field(default_factory=list)


# prm_text's single-domain probes: 300 steps (a fifth of a run), ranked by their meta loss
# alone, so their test set is cut to 2 problems (the builder draws it last: the training and
# meta data stay the same)
PROBE = ["trainer.steps=300", "trainer.checkpoint_every=0", "data.test_problems=2"]


def solver_methods(
    extra: list[str] | None = None, prefix: str = "", solvers: list[str] = SOLVERS
) -> list[Method]:
    extra = extra or []
    out = []
    for s in solvers:
        opts = ["solver.iters=5"] if s in ("neumann", "cg") else []
        out.append(Method(f"{prefix}{s}", [f"solver={s}", *opts, *extra]))
    return out


def other_methods() -> list[Method]:
    """The methods beyond the four classic solvers, one row each (issue: every method)."""
    return [
        Method("neumann warm(1)", ["solver=neumann", "solver.iters=1", "solver.warm_start=true"]),
        Method("cg warm(1)", ["solver=cg", "solver.iters=1", "solver.warm_start=true"]),
        Method("sama (Adam inner optimizer)", ["solver=sama", "trainer/inner_optimizer=adam"]),
        Method("scalebio", ["solver=scalebio"]),
        Method("doge", ["solver=doge"]),
        Method("DoReMi (excess-loss EG)", [], kind="doremi"),
        Method("odm", ["solver=odm", "trainer.outer_every=1"]),
        Method("loss_reweighting", ["solver=loss_reweighting"]),
        Method("meta_weight_net (first_order)", ["weights=meta_weight_net"]),
    ]


STUDIES = {
    "noisy_domains": Study(
        "noisy_domains",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method("clean-only oracle", ["domains=[d0,d1]", "trainer.learn_weights=false"]),
            *solver_methods(),
            *other_methods(),
        ],
        metrics=["accuracy", "loss"],
        quick=["trainer.steps=20", "trainer.log_every=10"],
    ),
    "digits": Study(
        "digits",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method("loss-based selection", [], kind="selection"),
            Method("clean-only oracle", ["domains=[clean]", "trainer.learn_weights=false"]),
            *solver_methods(),
            *other_methods(),
        ],
        metrics=["accuracy", "loss"],
        quick=["trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=10"],
    ),
    "lm_mixture": Study(
        "lm_mixture",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method("DoReMi (excess-loss EG)", [], kind="doremi"),
            Method(
                "first_order + mirror descent",
                [
                    "solver=first_order",
                    "trainer/outer_optimizer=mirror_descent",
                    "trainer.outer_optimizer.lr=1.0",
                ],
            ),
            # unrolled differentiates through plain SGD steps; this study trains with Adam
            *solver_methods(solvers=["first_order", "neumann", "cg"]),
            Method(
                "neumann warm(1)", ["solver=neumann", "solver.iters=1", "solver.warm_start=true"]
            ),
            # offline: 64 fixed-weight proxies of 300 steps (a fifth of a run), LightGBM, search
            Method(
                "offline search (RegMix: 64 proxies, LightGBM)",
                ["trainer.steps=300", "trainer.eval_every=0", "trainer.checkpoint_every=0"],
                kind="offline",
            ),
            # the same searched mixture, as fixed loss weights over batches drawn uniformly:
            # sampled by it, the run repeats its favoured domains 24-32 times and overfits
            Method("offline search, mixture as loss weights", kind="offline_loss"),
        ],
        paired_to=["uniform"],
        paired_metrics={"perplexity": False},
        metrics=["perplexity", "loss", "accuracy"],
        quick=[
            "trainer.steps=20",
            "trainer.log_every=10",
            "trainer.eval_every=10",
            "data.per_domain=64",
            "data.test_size=32",
        ],
        plots=["weights", "perplexity"],
    ),
    "prm": Study(
        "prm",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method("gold-only oracle", ["domains=[gold]", "trainer.learn_weights=false"]),
            Method("first_order, aggregation BCE (DreamPRM uses MSE)", ["solver=first_order"]),
            Method("cg, aggregation BCE", ["solver=cg", "solver.iters=5"]),
            Method("first_order, ranking meta loss", ["outer_loss=pairwise_ranking"]),
            Method(
                "3 domains: uniform",
                ["domains=[gold,noisy_20,noisy_45]", "trainer.learn_weights=false"],
            ),
            Method("3 domains: first_order, aggregation BCE", ["domains=[gold,noisy_20,noisy_45]"]),
            Method(
                "3 domains: first_order, ranking meta loss",
                ["domains=[gold,noisy_20,noisy_45]", "outer_loss=pairwise_ranking"],
            ),
            Method(
                "3 domains: cg, ranking meta loss",
                [
                    "domains=[gold,noisy_20,noisy_45]",
                    "outer_loss=pairwise_ranking",
                    "solver=cg",
                    "solver.iters=5",
                ],
            ),
        ],
        metrics=["prm@1", "prm@4", "prm@16", "prm@32", "majority@32", "random@32"],
        quick=[
            "trainer.steps=20",
            "trainer.log_every=10",
            "data.per_domain=64",
            "data.test_problems=16",
            "data.meta_problems=8",
        ],
        plots=["weights", "best_of_n"],
    ),
    "prm_text": Study(
        "prm_text",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            # each domain alone for a 300-step probe; rank by the probe's validation loss
            Method("best single domain (by validation loss)", PROBE, kind="best_single"),
            Method("data selection (drop the 2 worst domains)", PROBE, kind="selection_single"),
            Method("DreamPRM (first_order, MSE at both levels)", ["solver=first_order"]),
            # DreamPRM-1.5's instance-level weights: a weight per training solution, moved at
            # every inner step (each row is in a batch about 18 times in 1500 steps)
            Method(
                "instance table (DreamPRM-1.5)",
                [
                    "solver=first_order",
                    "weights=instance_table",
                    "~weights.parametrization",  # the preset's, for domain weights
                    "trainer.outer_every=1",
                    "trainer.outer_optimizer.lr=0.1",
                ],
            ),
            Method(
                "instance net (DreamPRM-1.5)",
                [
                    "solver=first_order",
                    "weights=instance_net",
                    "~weights.parametrization",
                    "weights.hidden=32",
                ],
            ),
        ],
        paired_to=["uniform"],
        paired_metrics={"prm@4": True, "prm@16": True, "prm@32": True},
        seeds=[0, 1, 2, 3, 4],
        # the frozen encoder layers' outputs, computed once per seed (and split) for all the
        # methods and probes of that seed instead of once per run (about 2 of a run's 5 minutes)
        shared=["trainer.prefix_cache_dir={runs}/prefix_cache"],
        metrics=[
            "prm@1",
            "prm@4",
            "prm@16",
            "prm@32",
            "majority@4",
            "majority@16",
            "majority@32",
            "random@16",
            "random@32",
        ],
        quick=[
            "trainer.steps=4",
            "trainer.log_every=2",
            "trainer.batch_size=10",
            "data.per_domain=8",
            "data.test_problems=4",
            "data.meta_problems=2",
            "data.meta_candidates=4",
        ],
        plots=["weights", "best_of_n"],
    ),
    "lm_pretrained": Study(
        "lm_pretrained",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method(
                "temperature sampling (T=2)",
                [
                    "trainer.learn_weights=false",
                    "trainer.sampling=temperature",
                    "trainer.temperature=2",
                ],
            ),
            Method("DoReMi (excess-loss EG)", [], kind="doremi"),
            Method("first_order", ["solver=first_order"]),
            Method(
                "neumann warm(1)",
                ["solver=neumann", "solver.iters=1", "solver.warm_start=true"],
            ),
            # 80 outer steps instead of 16: with outer_every=5 the weights are still moving
            # when this short run ends (README, "Five seeds, paired")
            Method("first_order outer_every=1", ["solver=first_order", "trainer.outer_every=1"]),
            # the whole meta set (32) in every outer step instead of 16: is it the meta noise?
            Method(
                "first_order meta batch 32", ["solver=first_order", "trainer.meta_batch_size=32"]
            ),
            # a meta set 4x as large (32 + 96 held-out news sequences; the same test set and
            # training data), meta batches of 16 as before: does the outer loop overfit 32?
            Method("first_order meta set 128", ["solver=first_order", "data.extra_meta=96"]),
            Method(
                "first_order outer_every=1 meta set 128",
                ["solver=first_order", "trainer.outer_every=1", "data.extra_meta=96"],
            ),
        ],
        paired_to=["uniform", "temperature sampling (T=2)"],
        paired_metrics={"perplexity": False},
        metrics=["perplexity", "loss"],
        quick=[
            "trainer.steps=4",
            "trainer.log_every=2",
            "trainer.eval_every=2",
            "trainer.batch_size=6",
            "data.per_domain=16",
            "data.test_size=8",
            "data.meta_size=8",
        ],
        plots=["weights", "perplexity"],
        seeds=[0, 1, 2, 3, 4],
    ),
    "lm_pretrained_files": Study(
        "lm_pretrained_files",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method(
                "temperature sampling (T=2)",
                [
                    "trainer.learn_weights=false",
                    "trainer.sampling=temperature",
                    "trainer.temperature=2",
                ],
            ),
            Method("DoReMi (excess-loss EG)", [], kind="doremi"),
            Method("first_order", ["solver=first_order"]),
            Method(
                "neumann warm(1)",
                ["solver=neumann", "solver.iters=1", "solver.warm_start=true"],
            ),
        ],
        paired_to=["uniform", "temperature sampling (T=2)"],
        paired_metrics={"perplexity": False},
        metrics=["perplexity", "loss"],
        quick=[
            "trainer.steps=4",
            "trainer.log_every=2",
            "trainer.eval_every=2",
            "trainer.batch_size=6",
            "data.per_domain=16",
            "data.test_size=8",
            "data.meta_size=8",
        ],
        plots=["weights", "perplexity"],
        seeds=[0, 1, 2, 3, 4],
    ),
    "text_domains": Study(
        "text_domains",
        [
            Method("uniform", ["trainer.learn_weights=false"]),
            Method("clean-only oracle", ["domains=[clean]", "trainer.learn_weights=false"]),
            # unrolled differentiates through plain SGD steps; this study trains with Adam
            *solver_methods(solvers=["first_order", "cg"]),
        ],
        metrics=["accuracy", "loss"],
        quick=[
            "trainer.steps=4",
            "trainer.log_every=2",
            "trainer.eval_every=2",
            "trainer.batch_size=6",
        ],
    ),
}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


REUSE = False  # set by --reuse: take finished runs from disk instead of running them again


#: the overrides a run of the study runner was made with, beside its summary.json
RUNNER_FILE = "runner_overrides.json"

#: settings that change how a run computes, not what: --reuse compares runs without them
NO_EFFECT = ("trainer.prefix_cache_dir=",)


def _portable(value: Any) -> Any:
    """A path in a setting as a path in the checkout: the same study in another clone of the
    repository is the same study."""
    return (
        re.sub(r"[^=\s]*/experiments/", "experiments/", value) if isinstance(value, str) else value
    )


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_settings(out: Path, cfg: Any) -> list[str]:
    """The settings of the composed ``cfg`` that differ from what the run in ``out`` recorded
    in its ``config.json``: a preset or config default edited since the run was made changes
    no override, and its run would otherwise be reused as if it had the new settings. Keys
    only one side has, settings without effect, and ``from:`` references (the run records
    the values it read) are not compared."""
    recorded = out / "config.json"
    if not recorded.is_file():
        return []
    try:
        now = _leaves(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # noqa: BLE001 - an interpolation only the app resolves: overrides decide
        return []
    then = _leaves(json.loads(recorded.read_text()))
    skip = tuple(o.rstrip("=") for o in NO_EFFECT) + ("trainer.progress",)
    return [
        f"{key}: {then[key]!r} then, {now[key]!r} now"
        for key in now
        if key in then
        and key not in skip
        and not (isinstance(now[key], str) and now[key].startswith("from:"))
        and _portable(then[key]) != _portable(now[key])
    ]


def reusable(out: Path, overrides: list[str], steps: int, cfg: Any = None) -> bool:
    """Whether ``--reuse`` may take the finished run in ``out`` for these ``overrides``: it
    was made with the same ones (a ``--quick`` run of 4 steps in the same folder was taken
    as the full run's result, silently), and, given the composed ``cfg``, with the settings
    it composes to today (:func:`changed_settings`). A run from before the runner kept its
    overrides counts only if it trained the same number of steps."""
    if not (out / "summary.json").is_file():
        return False
    kept = out / RUNNER_FILE
    if kept.is_file():

        def portable(items: list[str]) -> list[str]:
            return [_portable(str(i)) for i in items if not str(i).startswith(NO_EFFECT)]

        same = portable(json.loads(kept.read_text())) == portable(list(overrides))
    else:
        same = json.loads((out / "summary.json").read_text()).get("steps") == steps
    if not same:
        print(f"--reuse: {relative(out)} was made with other settings: running it again")
        return False
    changed = changed_settings(out, cfg) if cfg is not None else []
    if changed:
        print(
            f"--reuse: {relative(out)} was made with other settings ({'; '.join(changed[:3])}"
            f"{'; ...' if len(changed) > 3 else ''}): running it again"
        )
        return False
    return True


def run_once(overrides: list[str], out: Path) -> dict:
    """One run of the study into ``out``, a folder of the study's own ``runs/``: with
    ``--reuse`` a finished run there is read back; otherwise the study runs it again, in place
    of the earlier one (the library never overwrites a run by itself, so the runner removes
    its own run folder first)."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "trainer.progress=false"])
    if REUSE and reusable(out, overrides, cfg.trainer.steps, cfg):
        summary = json.loads((out / "summary.json").read_text())
    else:
        if run_dirs.is_run_dir(out):
            shutil.rmtree(out)
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run(cfg, output_dir=out, overrides=[*overrides, "trainer.progress=false"])
        write_text_atomic(out / RUNNER_FILE, json.dumps(overrides))
    summary["records"] = read_jsonl(out / "metrics.jsonl")
    summary["run_dir"] = relative(out)
    return summary


def portable_summary(summary: dict) -> dict:
    """``summary`` with the paths it records of this machine (a shared cache's folder) made
    relative to the repository, as its run directory is."""
    cache = summary.get("info", {}).get("prefix_cache", {})
    if "store" in cache:
        info = {**summary["info"], "prefix_cache": {**cache, "store": relative(cache["store"])}}
        summary = {**summary, "info": info}
    return summary


def relative(path: Path) -> str:
    """``path`` relative to the repository (results.json must not hold this machine's paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_method(
    study: Study, method: Method, seed: int, base: list[str], runs: Path, cache: dict
) -> dict:
    out = runs / slug(method.label) / f"seed{seed}"
    shared = [o.format(runs=runs) for o in study.shared]
    common = [f"experiment={study.name}", f"seed={seed}", *base, *shared]
    if method.kind == "run":
        summary = run_once([*common, *method.overrides], out)
    elif method.kind == "selection":
        summary = loss_based_selection(common, out, cache)
    elif method.kind == "best_single":
        summary = best_single(common, runs, cache, seed, method.overrides)
    elif method.kind == "selection_single":
        summary = selection_single(common, out, runs, cache, seed, method.overrides)
    elif method.kind == "offline":  # a quick check: 12 proxies, the fewest 5 folds take
        summary = offline_search(common, out, cache, seed, method.overrides, 12 if base else 64)
    elif method.kind == "offline_loss":
        summary = offline_as_loss_weights(study, common, out, runs, cache, seed)
    else:
        summary = doremi(common, out, cache, seed)
    summary.setdefault("time_s", summary["wall_time_s"])
    return summary


def offline_search(
    common: list[str], out: Path, cache: dict, seed: int, proxy: list[str], n: int = 64
) -> dict:
    """Offline mixture search (RegMix): ``n`` mixtures proposed around uniform, a short
    fixed-weight proxy run on each (``proxy`` overrides), a LightGBM fit of the proxies' meta
    loss (the target's validation loss) on their mixtures, the mean of the 100 best of 100,000
    simulated mixtures, and a full run on that mixture, sampled by it. Its time is the proxies'
    and the final run's together."""
    import numpy as np

    from bilevel.mixtures import fit_mixtures, propose, search, write_table

    names = list(cache[("uniform", seed)]["weights"])
    mixtures = propose(names, n, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    table = write_table(out / "mixtures.csv", [str(i) for i in range(n)], names, mixtures)
    fixed = ["trainer.learn_weights=false", "trainer.sampling=weights"]
    proxies = [
        # the study's --quick overrides (after the first two: experiment, seed) win over proxy's
        run_once(
            [*common[:2], *proxy, *common[2:], *fixed, f"weights.init=from:{table}:{i}"],
            out / f"proxy{i}",
        )
        for i in range(n)
    ]
    losses = np.array([p["meta_loss"] for p in proxies])
    fit = fit_mixtures(
        mixtures, losses, "meta_loss", names, "lightgbm", seed=seed, compare=["linear", "law"]
    )
    fit.save(out / "fit.json")
    mixture, predicted, _ = search(fit, samples=100_000, top=100, seed=seed)
    shares = "\n".join(f"    {d}: {v:.6f}" for d, v in zip(names, mixture, strict=True))
    write_text_atomic(out / "mixture.yaml", f"weights:\n  init:\n{shares}\n")
    summary = run_once(
        [*common, *fixed, f"weights.init=from:{out / 'mixture.yaml'}"], out / "final"
    )
    cv = ", ".join(f"{m} {c['spearman']:.3f}" for m, c in fit.cv.items())
    summary["note"] = f"{n} proxies; 5-fold Spearman {cv}; predicted meta loss {predicted:.4f}"
    if fit.extrapolates(predicted):
        low, high = fit.observed
        summary["note"] += f" (outside the proxies' [{low:.4f}, {high:.4f}]: extrapolated)"
    summary["offline"] = {"cv": fit.cv, "predicted": predicted, "proxies": n}
    summary["time_s"] = sum(p["wall_time_s"] for p in proxies) + summary["wall_time_s"]
    return summary


def loss_based_selection(common: list[str], out: Path, cache: dict, drop: int = 2) -> dict:
    """What a practitioner does by hand: warm up one model per domain, measure each on the
    meta set, drop the ``drop`` domains with the highest meta loss, train uniformly on the rest."""
    names = cache.setdefault(
        "names", run_once([*common, "trainer.steps=1"], out / "probe")["weights"].keys()
    )
    names = list(names)
    warmup, time_s = [], 0.0
    for d in names:
        s = run_once(
            [*common, f"domains=[{d}]", "trainer.learn_weights=false", "trainer.steps=300"],
            out / f"warmup_{d}",
        )
        warmup.append((s["meta_loss"], d))
        time_s += s["wall_time_s"]
    keep = [d for _, d in sorted(warmup)[: len(names) - drop]]
    summary = run_once(
        [*common, f"domains=[{','.join(keep)}]", "trainer.learn_weights=false"], out / "final"
    )
    summary["weights"] = {d: summary["weights"].get(d, 0.0) for d in names}
    summary["note"] = f"kept {keep}"
    summary["time_s"] = time_s + summary["wall_time_s"]
    return summary


def single_domain_runs(
    common: list[str], runs: Path, cache: dict, seed: int, probe: list[str]
) -> dict:
    """One short probe run per domain, trained on that domain alone (``probe``: the overrides
    that make it short, e.g. ``trainer.steps=50``), cached per seed: how a practitioner would
    rank the domains before committing to a full run."""
    key = ("singles", seed)
    if key not in cache:
        names = list(
            run_once([*common, "trainer.steps=1"], runs / "probe" / f"seed{seed}")["weights"]
        )
        cache[key] = {
            d: run_once(
                [*probe, *common, f"domains=[{d}]", "trainer.learn_weights=false"],
                runs / "single_probe" / d / f"seed{seed}",
            )
            for d in names
        }
    return cache[key]


def offline_as_loss_weights(
    study: Study, common: list[str], out: Path, runs: Path, cache: dict, seed: int
) -> dict:
    """The study's offline search's mixture (its ``mixture.yaml``) as fixed loss weights over
    uniformly drawn batches, instead of sampling the batches by it. Its time includes the
    search's proxies (the search's own final run is not needed for it)."""
    source = next(m for m in study.methods if m.kind == "offline")
    searched = cache[(source.label, seed)]
    mixture = runs / slug(source.label) / f"seed{seed}" / "mixture.yaml"
    summary = run_once(
        [*common, "trainer.learn_weights=false", f"weights.init=from:{mixture}"], out
    )
    proxies_s = searched["time_s"] - searched["wall_time_s"]
    summary["note"] = f"the mixture of {source.label!r}, as fixed loss weights"
    summary["time_s"] = proxies_s + summary["wall_time_s"]
    return summary


def best_single(common: list[str], runs: Path, cache: dict, seed: int, probe: list[str]) -> dict:
    """The domain whose probe model alone has the lowest validation (meta) loss, then trained
    alone for the full run."""
    singles = single_domain_runs(common, runs, cache, seed, probe)
    name = min(singles, key=lambda d: singles[d]["meta_loss"])
    summary = run_once(
        [*common, f"domains=[{name}]", "trainer.learn_weights=false"],
        runs / "single" / name / f"seed{seed}",
    )
    summary["weights"] = {d: float(d == name) for d in singles}
    summary["note"] = f"picked {name}"
    summary["time_s"] = sum(s["wall_time_s"] for s in singles.values()) + summary["wall_time_s"]
    return summary


def selection_single(
    common: list[str],
    out: Path,
    runs: Path,
    cache: dict,
    seed: int,
    probe: list[str],
    drop: int = 2,
) -> dict:
    """Data selection: drop the ``drop`` domains whose own probe models have the worst
    validation (meta) loss, train uniformly on the rest."""
    singles = single_domain_runs(common, runs, cache, seed, probe)
    names = list(singles)
    keep = sorted(names, key=lambda d: singles[d]["meta_loss"])[: len(names) - drop]
    keep = [d for d in names if d in keep]
    summary = run_once(
        [*common, f"domains=[{','.join(keep)}]", "trainer.learn_weights=false"], out / "final"
    )
    summary["weights"] = {d: summary["weights"].get(d, 0.0) for d in names}
    summary["note"] = f"kept {keep}"
    summary["time_s"] = sum(s["wall_time_s"] for s in singles.values()) + summary["wall_time_s"]
    return summary


def doremi(common: list[str], out: Path, cache: dict, seed: int) -> dict:
    """DoReMi: reference = the uniform run of this seed; proxy run with the excess-loss EG update;
    a fresh model trained on the proxy run's average weights (sampled by weight, as DoReMi)."""
    reference = ROOT / cache[("uniform", seed)]["run_dir"]
    proxy = run_once(
        [
            *common,
            "solver=doremi",
            f"solver.reference={reference}",
            "trainer/outer_optimizer=mirror_descent",
            "trainer.outer_optimizer.lr=1.0",
            "trainer.outer_optimizer.smoothing=0.001",
            "trainer.outer_every=1",
        ],
        out / "proxy",
    )
    history = [r["weights"] for r in proxy["records"] if "weights" in r]
    names = list(history[0])
    average = [statistics.fmean(h[n] for h in history) for n in names]
    summary = run_once(
        [
            *common,
            "trainer.learn_weights=false",
            "trainer.sampling=weights",
            f"weights.init=[{','.join(f'{v:.6f}' for v in average)}]",
        ],
        out / "final",
    )
    # weights from the proxy run, test curve from the final model
    summary["records"] = [r for r in proxy["records"] if "weights" in r] + [
        r for r in summary["records"] if "test" in r
    ]
    summary["weights"] = dict(zip(names, average))
    summary["time_s"] = proxy["wall_time_s"] + summary["wall_time_s"]
    return summary


# -- report --------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(study: Study, results: dict[str, list[dict]]) -> str:
    names = list(next(iter(results.values()))[0]["weights"])
    head = [
        "method",
        *(f"test {m}" for m in study.metrics),
        "meta loss",
        "weights (" + ", ".join(names) + ")",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in results.items():
        cells = [label]
        cells += [mean_std([r["test"][m] for r in runs]) for m in study.metrics]
        cells.append(mean_std([r["meta_loss"] for r in runs]))
        cells.append(
            " ".join(
                f"{statistics.fmean(r['weights'].get(n, 0.0) for r in runs):.3f}" for n in names
            )
        )
        cells.append(f"{statistics.fmean(r['time_s'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_section(study: Study, results: dict[str, list[dict]]) -> list[str]:
    """The study's paired differences (``experiments/paired.py``), as report lines."""
    if not study.paired_to:
        return []
    from bilevel_experiments.paired import paired_table

    return [
        "Paired differences, method − baseline on the same seed (mean, 95% t-interval over "
        "the seeds both ran, how many seeds the method did better, each seed's difference):",
        "",
        paired_table(results, study.paired_to, list(study.paired_metrics), study.paired_metrics),
        "",
    ]


def plot_weights(study: Study, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def changes(runs: list[dict]) -> bool:
        recs = [x for x in runs[0]["records"] if "weights" in x]
        return len(recs) > 1 and recs[0]["weights"] != recs[-1]["weights"]

    learned = {k: v for k, v in results.items() if changes(v)}
    if not learned:
        return
    cols = min(3, len(learned))
    rows = (len(learned) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (label, runs) in zip(axes.flat, learned.items()):
        recs = [[x for x in r["records"] if "weights" in x] for r in runs]
        steps = [x["step"] for x in recs[0]]
        for name in recs[0][0]["weights"]:
            series = [
                [x["weights"].get(name, float("nan")) for x in rec]
                for rec in recs
                if len(rec) == len(steps)
            ]
            ax.plot(steps, [statistics.fmean(v) for v in zip(*series)], label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("inner step")
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(learned) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{study.name}: domain weights (mean over seeds)")
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def plot_curve(
    results,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Callable[[dict], tuple[list[float], list[float]]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in results.items():
        curves = [series(r) for r in runs]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        xs = curves[0][0]
        ys = [statistics.fmean(v) for v in zip(*(c[1] for c in curves if len(c[1]) == len(xs)))]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def perplexity_series(r: dict, tokens_per_step: int) -> tuple[list[float], list[float]]:
    tests = [x for x in r["records"] if "test" in x]
    return [x["step"] * tokens_per_step for x in tests], [x["test"]["perplexity"] for x in tests]


def best_of_n_plot(results: dict[str, list[dict]], path: Path, name: str = "prm") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(
        {
            int(k.split("@")[1])
            for r in results.values()
            for k in r[0]["test"]
            if k.startswith("prm@")
        }
    )
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, runs in results.items():
        ys = [statistics.fmean(r["test"][f"prm@{n}"] for r in runs) for n in ns]
        ax.plot(ns, ys, marker="o", label=f"PRM: {label}")
    first = next(iter(results.values()))
    for key, style in (("majority", "k--"), ("random", "k:")):
        ax.plot(
            ns,
            [statistics.fmean(r["test"][f"{key}@{n}"] for r in first) for n in ns],
            style,
            label=f"{key} vote" if key == "majority" else "random choice",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N candidates per problem")
    ax.set_ylabel("best-of-N accuracy")
    ax.set_title(f"{name}: best-of-N selection (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def make_plots(
    study: Study, results: dict, folder: Path, base: list[str], suffix: str = ""
) -> list[str]:
    """The study's figures; returns the file names written. ``suffix`` (``_quick``,
    ``_partial``) keeps a smoke test's or a partial rerun's figures off the study's own."""
    images = []
    if "weights" in study.plots:
        plot_weights(study, results, folder / f"weights{suffix}.png")
        images.append(f"weights{suffix}.png")
    if "perplexity" in study.plots:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={study.name}", *base])
        tokens = cfg.trainer.batch_size * cfg.data.seq_len
        plot_curve(
            results,
            folder / f"perplexity{suffix}.png",
            f"{study.name}: target perplexity",
            "tokens seen",
            "test perplexity (target)",
            lambda r: perplexity_series(r, tokens),
        )
        images.append(f"perplexity{suffix}.png")
    if "best_of_n" in study.plots:
        best_of_n_plot(results, folder / f"best_of_n{suffix}.png", study.name)
        images.append(f"best_of_n{suffix}.png")
    return images


def update_readme(readme: Path, body: str) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text() if readme.exists() else f"# {readme.parent.name}\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    write_text_atomic(readme, f"{head}{start}\n{body}\n{end}{tail}")


def parse_methods(text: str, labels: list[str]) -> tuple[list[str], list[str]]:
    """``--methods`` as (known labels, unknown pieces). Labels hold commas themselves
    ("first_order, aggregation BCE (DreamPRM uses MSE)"), so the comma-separated pieces are
    joined back into the longest label they spell; a piece that spells none is unknown (it
    was dropped without a word, and the rerun ran the other methods only)."""
    pieces = text.split(",")
    wanted, unknown, i = [], [], 0
    while i < len(pieces):
        for j in range(len(pieces), i, -1):
            candidate = ",".join(pieces[i:j]).strip()
            if candidate in labels:
                wanted.append(candidate)
                i = j
                break
        else:
            if pieces[i].strip():
                unknown.append(pieces[i].strip())
            i += 1
    return wanted, unknown


def studies_help() -> str:
    """``--help``'s list of the studies, their seeds and method labels (``--methods`` takes
    them), and what ``--quick`` checks."""
    lines = ["studies (seeds; method labels for --methods):"]
    for study in STUDIES.values():
        lines.append(f"  {study.name} (seeds {' '.join(map(str, study.seeds))}):")
        lines.append("      " + " | ".join(m.label for m in study.methods))
    lines += [
        "",
        "--quick runs every method once (seed 0) for a few steps (the study's quick",
        "overrides) into runs_quick/ and results_quick.*: it checks that each method runs",
        "end to end and that the table and plots are written; its numbers mean nothing.",
        "Run directories: experiments/<study>/runs/<method>/seed<N>/.",
    ]
    return "\n".join(lines)


def seed_argument(text: str) -> int:
    """``--seeds`` values: integers in [0, 2**32), refused by argparse before any run (a
    negative one stopped the study with a traceback from its first run)."""
    try:
        return check_seed(text, "--seeds")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=studies_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", choices=list(STUDIES))
    parser.add_argument(
        "--seeds", type=seed_argument, nargs="+", help="default: the study's own (0 1 2, or 0-4)"
    )
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated labels to run: a partial rerun, written to results_partial.* "
        "(the study's results.json, results.md and README stay as they are)",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps, seed 0, no README")
    parser.add_argument("--out", help="folder for results (default experiments/<study>)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take runs that finished before (summary.json) from disk",
    )
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    study = STUDIES[args.study]
    folder = Path(args.out) if args.out else ROOT / "experiments" / study.name
    # a smoke test's runs apart from the study's: run_once replaces the run in its folder, so
    # a --quick run of 4 steps deleted the full run of the same method and seed
    runs = folder / ("runs_quick" if args.quick else "runs")
    base = study.quick if args.quick else []
    chosen = args.seeds or study.seeds
    seeds = [chosen[0]] if args.quick else chosen
    labels = [m.label for m in study.methods]
    wanted, unknown = parse_methods(args.methods, labels)
    if unknown or (args.methods and not wanted):
        parser.error(
            f"--methods: {', '.join(map(repr, unknown)) or 'no label'} is not a method of "
            f"{study.name}; its methods: {' | '.join(labels)}"
        )
    methods = [m for m in study.methods if not wanted or m.label in wanted]
    # a partial rerun (some methods, or other seeds) must not replace the study's full table,
    # its figures and its README section with the few rows it has: it writes beside them
    partial = bool(wanted) or sorted(seeds) != sorted(study.seeds)
    suffix = "_quick" if args.quick else "_partial" if partial else ""
    needs_uniform = any(m.kind in ("doremi", "offline", "offline_loss") for m in methods)
    if needs_uniform and not any(m.label == "uniform" for m in methods):
        methods.insert(0, next(m for m in study.methods if m.label == "uniform"))
    if any(m.kind == "offline_loss" for m in methods) and not any(
        m.kind == "offline" for m in methods
    ):  # the mixture it uses comes from the search
        source = next(m for m in study.methods if m.kind == "offline")
        at = next(i for i, m in enumerate(methods) if m.kind == "offline_loss")
        methods.insert(at, source)
    torch.set_num_threads(int(os.environ.get("BILEVEL_THREADS", "2")))
    quiet_third_parties()
    results: dict[str, list[dict]] = {}
    cache: dict = {}
    for method in methods:
        for seed in seeds:
            summary = run_method(study, method, seed, base, runs, cache)
            cache[(method.label, seed)] = summary
            results.setdefault(method.label, []).append(summary)
            print(
                f"{study.name} | {method.label} | seed {seed} | "
                + ", ".join(f"{m} {summary['test'][m]:.4f}" for m in study.metrics)
                + f" | {summary['time_s']:.0f} s",
                flush=True,
            )
    total = sum(r["time_s"] for rs in results.values() for r in rs)
    folder.mkdir(parents=True, exist_ok=True)
    # the numbers first: a figure that fails to draw must not cost the runs' results
    numbers = json.dumps(
        {
            label: [portable_summary({k: v for k, v in r.items() if k != "records"}) for r in rs]
            for label, rs in results.items()
        },
        indent=1,
        default=str,
    )
    write_text_atomic(folder / f"results{suffix}.json", numbers)
    images = make_plots(study, results, folder, base, suffix)
    command = f"python scripts/experiments.py {study.name}" + (" --quick" if args.quick else "")
    report = "\n".join(
        [
            f"Command: `{command}` (seeds {', '.join(map(str, seeds))}) on {machine_line()}; "
            f"{total / 60:.1f} min of training in all. Mean ± std over seeds; `train s` is the "
            "mean training-loop time of one seed of a method (all its runs: warm-ups, proxy). "
            "Per-seed figures move a little from one CPU to another (other kernels sum in "
            "another order): see docs/studies.md, Reproducing.",
            "",
            table(study, results),
            "",
            *paired_section(study, results),
            *(f"![{img}]({img})" for img in images),
        ]
    )
    write_text_atomic(folder / f"results{suffix}.md", f"{report}\n")
    if not suffix:
        update_readme(folder / "README.md", report)
    print(report)
    if partial and not args.quick:
        print(
            f"a partial rerun: wrote {folder / f'results{suffix}.json'} and .md; the study's "
            "results.json, results.md, figures and README are unchanged (rerun every method "
            "with --reuse to update them from the runs on disk)"
        )


if __name__ == "__main__":
    sys.exit(main())
