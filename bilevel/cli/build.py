"""Building every component of a run from its composed config, with ``_target_``.

Users plug in their own classes and functions by naming them in a config group; an input error
on the way (a target that does not import, a wrong or bad argument, a model that does not fit
the data) becomes one line naming the field (:class:`~bilevel.errors.ConfigError`), while a bug
inside the user's own component keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bilevel.cli.preflight import root_cause
from bilevel.data.columns import num_rows
from bilevel.data.domain_data import DomainData
from bilevel.errors import ConfigError, first_line, is_finite_number
from bilevel.strategies.distributed import DistContext
from bilevel.trainer import BilevelTrainer, TrainerConfig
from bilevel.weights import values_by_name

__all__ = [
    "build",
    "build_model",
    "check_target",
    "interpolation_hint",
    "make_trainer",
    "seed_everything",
]

_OPTIMIZER_KEYS = ("inner_optimizer", "outer_optimizer", "inner_scheduler")

#: what the last build learned that a crash's message can be read against (the sizes the data
#: announced to the model)
CONTEXT: dict[str, Any] = {}


def init_from_run(text: str, names: list[str]) -> list[float]:
    """Initial weights from elsewhere, as values in the order of ``names`` (matched by name):

    * ``from:<run dir>``: the run's final weights (its ``summary.json``);
    * ``from:<run dir>:mean``: their mean over the run's log events after step 0 (its
      ``metrics.jsonl``: DoReMi's proxy-to-final average);
    * ``from:<mixture.yaml>``: the mixture ``bilevel-mix search`` wrote (``weights.init``);
    * ``from:<mixtures.csv>:<id>``: row ``id`` of a table ``bilevel-mix propose`` wrote (a
      sweep of fixed-weight proxies: ``'weights.init=from:m.csv:${mixture_id}'
      '+mixture_id=range(0,64)'``)."""
    spec = text.removeprefix("from:")
    field = "weights.init"
    head, _, tail = spec.rpartition(":")
    if head.endswith(".csv"):
        weights = _csv_row(Path(head).expanduser(), tail, field)
    elif Path(spec).suffix in (".yaml", ".yml", ".json") and Path(spec).is_file():
        weights = _mixture_file(Path(spec), field)
    else:
        weights = _run_weights(spec, field)
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(
            field,
            f"from:{spec}: its domains {sorted(weights)} lack {missing} of this data's {names}",
        )
    return [float(weights[n]) for n in names]


def _csv_row(path: Path, row: str, field: str) -> dict[str, float]:
    """Row ``row`` of a mixtures table; a share of 0 becomes 1e-6 (softmax weights cannot be
    exactly 0; a domain at 1e-6 is drawn once in a million rows)."""
    from bilevel.mixtures import floored, read_mixtures

    table = read_mixtures(path, field)
    if row not in table.ids:
        shown = ", ".join(table.ids[:5]) + (" ..." if len(table.ids) > 5 else "")
        raise ConfigError(field, f"from:{path}:{row}: no row with id {row!r} (ids: {shown})")
    values = floored(table.values[table.ids.index(row)])
    return dict(zip(table.columns, (float(v) for v in values), strict=True))


def _mixture_file(path: Path, field: str) -> dict[str, float]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
        init = data["weights"]["init"]
        return {str(k): float(v) for k, v in init.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError):
        raise ConfigError(
            field,
            f"from:{path}: not a mixture file (weights: init: {{domain: share}}, as "
            "bilevel-mix search writes)",
        ) from None


def _run_weights(spec: str, field: str) -> dict[str, float]:
    how = "final"
    head, _, tail = spec.rpartition(":")
    if tail in ("mean", "final") and head:
        spec, how = head, tail
    run = Path(spec).expanduser()
    if not run.is_dir():
        raise ConfigError(field, f"from:{spec}: no such run directory")
    if how == "final":
        summary = run / "summary.json"
        if not summary.is_file():
            raise ConfigError(
                field,
                f"from:{spec}: the run has no summary.json (it has not finished): use "
                f"from:{spec}:mean for the mean over its logged weights, or finish it first",
            )
        import json

        return json.loads(summary.read_text()).get("weights") or {}
    from bilevel.logging import read_jsonl

    records = [
        r["weights"]
        for r in read_jsonl(run / "metrics.jsonl")
        if isinstance(r.get("weights"), dict) and r.get("step", 0) > 0
    ]
    if not records:
        raise ConfigError(field, f"from:{spec}:mean: the run logged no weights after step 0")
    return {n: sum(r.get(n, 0.0) for r in records) / len(records) for n in records[0]}


def _seed_for(cfg: DictConfig) -> dict[str, Any]:
    """``seed`` for a data builder that takes one and is not given it by its preset (a
    ``data=custom`` builder of one's own): a sweep over ``seed`` then draws other data per seed,
    as every shipped builder does (``seed: ${seed}``)."""
    node = cfg.data
    if (
        not isinstance(node, DictConfig)
        or "seed" in node
        or not isinstance(node.get("_target_"), str)
    ):
        return {}
    try:
        factory = build(node, "data", _partial_=True)
    except ConfigError:
        return {}  # the build itself says why, with its own line
    return {"seed": int(cfg.seed)} if _accepts(factory, "seed") else {}


def _per_example_sizes(weights_cfg: DictConfig, data: DomainData) -> dict[str, Any]:
    """What weights stored or computed per example need from the data: ``size`` (the training
    rows, for ``weights=instance_table``) and ``feature_dim`` (the width of the feature column
    an instance net reads), each only where the weights take it and the config does not set
    it."""
    out: dict[str, Any] = {}
    if not isinstance(weights_cfg.get("_target_"), str):
        return out
    factory = build(weights_cfg, "weights", _partial_=True)
    if _accepts(factory, "size") and "size" not in weights_cfg:
        out["size"] = num_rows(data.train)
    features = weights_cfg.get("features")
    if features and "feature_dim" not in weights_cfg:
        column = data.train.get(features)
        if not isinstance(column, torch.Tensor) or not column.is_floating_point():
            columns = ", ".join(sorted(data.train))
            raise ConfigError(
                "weights.features",
                f"the training data has no float column {features!r} (its columns: {columns}); "
                "give one in the data (float [N, F]), or use weights=meta_weight_net",
            )
        out["feature_dim"] = int(column[0].numel())
    return out


def check_target(target: str, field: str) -> None:
    """Raise a one-line :class:`ConfigError` when ``target`` cannot be located: the module does
    not import, or it imports but lacks the attribute (Hydra reports the latter as a misleading
    "is not a package")."""
    parts = target.split(".")
    module = None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and not name.startswith(err.name):
                # the module exists but one of its own imports is missing
                raise ConfigError(field, f"cannot import {name!r}: {err}") from None
            continue
        obj: Any = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                public = sorted(a for a in dir(obj) if not a.startswith("_"))
                close = difflib.get_close_matches(attr, public, n=3, cutoff=0.6)
                hint = (
                    f"did you mean {' or '.join(repr(c) for c in close)}?"
                    if close
                    else f"it has: {', '.join(public[:12])}"
                )
                raise ConfigError(
                    field,
                    f"cannot find {target!r}: {'.'.join(parts[: parts.index(attr)])!r} has no "
                    f"attribute {attr!r} ({hint})",
                )
            obj = getattr(obj, attr)
        return
    here = Path.cwd()
    local = (here / f"{parts[0]}.py").is_file() or (here / parts[0] / "__init__.py").is_file()
    hint = (
        f"; {parts[0]!r} is in the working directory, which is not on the path: run with "
        "PYTHONPATH=. (e.g. PYTHONPATH=. bilevel-run ...)"
        if local
        else ""
    )
    raise ConfigError(field, f"cannot import {target!r}: no module {parts[0]!r} on the path{hint}")


def build(node: Any, field: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; input errors (a target that does not import, wrong or
    bad arguments) become a one-line :class:`ConfigError`, anything else keeps its traceback."""
    if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
        check_target(node["_target_"], field)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = root_cause(err)
        if isinstance(cause, ConfigError):
            raise cause from None
        if cause is not err and not isinstance(cause, ImportError | TypeError | ValueError):
            raise  # a bug inside the user's component: show where
        message = first_line(str(cause)) or type(cause).__name__
        message = interpolation_hint(message)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        where = f"{field} ({target})" if target else field
        raise ConfigError(where, message + _preset_hint(field, target, message)) from None
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        message = first_line(str(err)) or type(err).__name__
        raise ConfigError(field, interpolation_hint(message)) from None


def _preset_hint(field: str, target: Any, message: str) -> str:
    """For your own data or model function, or a per-example weighting, refused a key that a
    preset set (``names``, ``hidden``, an experiment's ``weights.parametrization``): which
    preset, and how to drop the key or start from the empty preset instead."""
    if field not in ("data", "model", "weights") or "unexpected keyword argument" not in message:
        return ""
    if not isinstance(target, str):
        return ""
    choices = _choices()
    key = re.search(r"unexpected keyword argument '(\w+)'", message)
    own = not target.startswith("bilevel")
    if choices.get("experiment") and key and (choices.get(field) == "custom" or not own):
        preset = choices["experiment"]
        return (
            f"; experiment={preset} sets {field}.{key.group(1)} for its own {field}: leave "
            f"out experiment={preset}, or drop the key with ~{field}.{key.group(1)}"
        )
    if own:
        return (
            f"; the keys of the {field} preset reach your function too: start from the empty "
            f"one, {field}=custom {field}._target_={target}"
        )
    return ""


def _choices() -> dict[str, Any]:
    """The config groups chosen for this run (``{"data": "custom", ...}``), ``{}`` outside
    Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except (ValueError, ImportError):
        return {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _accepts(factory: Any, name: str) -> bool:
    target = getattr(factory, "func", factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(node: DictConfig, data: DomainData) -> torch.nn.Module:
    """The model, given the sizes the data announces that the factory accepts and the config
    does not already set."""
    factory = build(node, "model", _partial_=True)
    extra = {k: v for k, v in data.model_kwargs.items() if k not in node and _accepts(factory, k)}
    try:
        model = factory(**extra)
    except ConfigError:
        raise  # it names its field already
    except (TypeError, ValueError) as err:
        message = str(err)
        hint = _preset_hint("model", node.get("_target_"), message) or _fit_hint(message, data)
        raise ConfigError(f"model ({node.get('_target_')})", message + hint) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("model", f"_target_ must build a torch.nn.Module, got {type(model)}")
    return model


def _fit_hint(message: str, data: DomainData) -> str:
    """For a model that does not fit the data: sizes it needs that the data does not supply
    (``MLP`` on token data), or a key it does not take (``hidden``, set for another model by
    an experiment preset), and how to fix either from the command line."""
    if "missing" in message and "required" in message:
        needed = re.findall(r"'(\w+)'", message)
        supplied = ", ".join(sorted(data.model_kwargs)) or "none"
        example = f" (model.{needed[0]}=...)" if needed else ""
        return (
            f"; this data supplies the sizes: {supplied}. Pick a model that fits the data, or "
            f"set them{example}"
        )
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:
        key = unexpected.group(1)
        return (
            f"; model.{key} was set for another model (by a preset or the command line): drop "
            f"it with ~model.{key}"
        )
    return ""


def make_trainer(
    cfg: DictConfig,
    dist: DistContext,
    device: torch.device,
    run_dir: Path | None,
    overrides: list[str] | None = None,
):
    """Everything :func:`run` builds, up to a ready :class:`BilevelTrainer`."""
    data = build(cfg.data, "data", **_seed_for(cfg))
    if not isinstance(data, DomainData):
        raise ConfigError(
            "data", f"_target_ must return a bilevel.data.DomainData, got {type(data)}"
        )
    CONTEXT["model_kwargs"] = dict(getattr(data, "model_kwargs", {}) or {})
    if cfg.get("domains") is not None:
        if isinstance(cfg.domains, str):
            raise ConfigError(
                "domains", f"must be a list of domain names, e.g. domains=[{cfg.domains}]"
            )
        data = data.subset(list(cfg.domains))
    data.validate()
    names = cfg.weights.get("names")
    if names is not None and list(names) != list(data.names):
        raise ConfigError(
            "weights.names", f"{list(names)} do not match the data's domains {data.names}"
        )
    init = cfg.weights.get("init")
    if isinstance(init, str) and init.startswith("from:"):  # a proxy run's learned weights
        init = init_from_run(init, data.names)
        OmegaConf.update(cfg, "weights.init", init, merge=False)
    if init is not None:
        if isinstance(init, str):
            raise ConfigError(
                "weights.init", f"must be a list of {len(data.names)} numbers, got {init!r}"
            )
        if isinstance(init, Mapping):  # weights.init={d0:0.4,d1:0.4,d2:0.1,d3:0.1}
            try:
                init = values_by_name(init, data.names)
            except ValueError as err:
                raise ConfigError("weights.init", str(err).removeprefix("init ")) from None
            OmegaConf.update(cfg, "weights.init", init, merge=False)
        values = list(init) if not isinstance(init, (int, float)) else [init]
        if len(values) != len(data.names):
            raise ConfigError(
                "weights.init",
                f"has {len(values)} value{'s' if len(values) != 1 else ''} but there are "
                f"{len(data.names)} domains {data.names}: give one per domain, e.g. "
                f"weights.init=[{','.join(['1'] * len(data.names))}]",
            )
        if any(not (is_finite_number(v) and v > 0) for v in values):
            raise ConfigError(
                "weights.init", f"initial weight values must be finite numbers > 0, got {values}"
            )
    model = build_model(cfg.model, data)
    weights_cfg = OmegaConf.create({k: v for k, v in cfg.weights.items() if k != "names"})
    extra: dict[str, Any] = {"names": data.names, "device": device}
    extra.update(_per_example_sizes(weights_cfg, data))
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float64 in dtypes and "dtype" not in weights_cfg:
        factory = build(weights_cfg, "weights", _partial_=True)
        if _accepts(factory, "dtype"):
            extra["dtype"] = torch.float64  # a float64 model gets float64 hypergradients
    weights = build(weights_cfg, "weights", **extra)
    solver = build(cfg.solver, "solver")
    inner_loss = build(cfg.inner_loss, "inner_loss")
    outer_loss = build(cfg.outer_loss, "outer_loss")  # the trainer checks both losses
    loop = {
        k: v
        for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
        if k not in _OPTIMIZER_KEYS
    }
    trainer_config = TrainerConfig.from_mapping(loop)
    optimizers = {
        key: build(cfg.trainer[key], f"trainer.{key}") if cfg.trainer.get(key) else None
        for key in _OPTIMIZER_KEYS
    }
    # every tracker the logger group selected (logger=[wandb,tensorboard] merges both keys)
    loggers = [
        build(node, f"logger.{key}")
        for key, node in (cfg.get("logger") or {}).items()
        if node is not None and OmegaConf.is_dict(node) and "_target_" in node
    ]
    return BilevelTrainer(
        model,
        weights,
        solver,
        inner_loss,
        outer_loss,
        data,
        trainer_config,
        inner_optimizer=optimizers["inner_optimizer"],
        outer_optimizer=optimizers["outer_optimizer"],
        inner_scheduler=optimizers["inner_scheduler"],
        device=device,
        run_dir=run_dir,
        loggers=loggers,
        dist=dist,
        seed=int(cfg.seed),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        overrides=overrides,
    )


def interpolation_hint(message: str) -> str:
    """For ``${model.path}`` read by a data preset whose model has no ``path`` (text data with
    ``model=mlp``): what is missing where, and what to do; other messages are returned as
    they are."""
    found = re.search(r"Interpolation key '([\w.]+)' not found", message)
    if not found:
        return message
    missing = found.group(1)
    group, _, leaf = missing.partition(".")
    if not leaf:
        return f"reads ${{{missing}}}, which this config does not set: set it, e.g. +{missing}=..."
    return (
        f"reads ${{{missing}}}, which the chosen {group} does not have: pick a {group} that "
        f"has {leaf} (this preset goes with another {group}), or set +{missing}=..."
    )
