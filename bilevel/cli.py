"""``bilevel-run`` / ``python -m bilevel``: the Hydra app over ``configs/``.

Builds every component from its config group with ``_target_`` (so users plug in their own
classes and functions), validates the input before any training, runs
:class:`~bilevel.BilevelTrainer` and prints the learned weights. Bad input ends the process with
one line naming the field and exit code 2; a run stopped by non-finite updates exits with 3.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bilevel.data.domain_data import DomainData
from bilevel.distributed import DistContext, init_distributed
from bilevel.errors import ConfigError
from bilevel.logging.jsonl import to_jsonable
from bilevel.trainer import BilevelTrainer, NonFiniteError, TrainerConfig

__all__ = ["main", "run"]

_OPTIMIZER_KEYS = ("inner_optimizer", "outer_optimizer", "inner_scheduler")


def config_dir() -> str:
    """``$BILEVEL_CONFIG_DIR`` or the repository's ``configs/`` next to the package."""
    candidates = [
        os.environ.get("BILEVEL_CONFIG_DIR"),
        Path(__file__).resolve().parents[1] / "configs",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return str(Path(candidate).resolve())
    raise SystemExit(
        "bilevel: cannot find the configs/ folder; install the repository with "
        "`pip install -e .` or set BILEVEL_CONFIG_DIR"
    )


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def build(node: Any, field: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; input errors (a target that does not import, wrong or
    bad arguments) become a one-line :class:`ConfigError`, anything else keeps its traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = _root_cause(err)
        if isinstance(cause, ConfigError):
            raise cause from None
        if cause is not err and not isinstance(cause, ImportError | TypeError | ValueError):
            raise  # a bug inside the user's component: show where
        message = str(cause) if cause is not err else str(err).splitlines()[0]
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        where = f"{field} ({target})" if target else field
        raise ConfigError(where, message.strip()) from None
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(field, str(err)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(node: DictConfig, data: DomainData) -> torch.nn.Module:
    """The model, given the sizes the data announces that the factory accepts and the config
    does not already set."""
    factory = build(node, "model", _partial_=True)
    target = getattr(factory, "func", factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {
        k: v for k, v in data.model_kwargs.items() if k not in node and (takes_any or k in params)
    }
    try:
        model = factory(**extra)
    except (TypeError, ValueError) as err:
        raise ConfigError("model", str(err)) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("model", f"_target_ must build a torch.nn.Module, got {type(model)}")
    return model


def _device(dist_device: str) -> str:
    if dist_device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{dist_device!r} requested but CUDA is not available here")
    return dist_device


def make_trainer(cfg: DictConfig, dist: DistContext, device: torch.device, run_dir: Path | None):
    """Everything :func:`run` builds, up to a ready :class:`BilevelTrainer`."""
    data = build(cfg.data, "data")
    if not isinstance(data, DomainData):
        raise ConfigError(
            "data", f"_target_ must return a bilevel.data.DomainData, got {type(data)}"
        )
    if cfg.get("domains") is not None:
        data = data.subset(list(cfg.domains))
    data.validate()
    names = cfg.weights.get("names")
    if names is not None and list(names) != list(data.names):
        raise ConfigError(
            "weights.names", f"{list(names)} do not match the data's domains {data.names}"
        )
    init = cfg.weights.get("init")
    if init is not None:
        values = list(init) if not isinstance(init, (int, float)) else [init]
        if len(values) != len(data.names):
            raise ConfigError(
                "weights.init",
                f"has {len(values)} values but there are {len(data.names)} domains {data.names}",
            )
        if any(not isinstance(v, (int, float)) or not v > 0 for v in values):
            raise ConfigError("weights.init", f"initial weight values must be > 0, got {values}")
    weights_cfg = {k: v for k, v in cfg.weights.items() if k != "names"}
    weights = build(OmegaConf.create(weights_cfg), "weights", names=data.names, device=device)
    model = build_model(cfg.model, data)
    solver = build(cfg.solver, "solver")
    inner_loss = build(cfg.inner_loss, "inner_loss")
    outer_loss = build(cfg.outer_loss, "outer_loss")
    for field, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
        if not callable(fn):
            raise ConfigError(field, f"must build a callable (output, batch) -> Tensor, got {fn!r}")
    loop = {
        k: v
        for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
        if k not in _OPTIMIZER_KEYS
    }
    try:
        trainer_config = TrainerConfig(**loop)
    except TypeError as err:
        raise ConfigError("trainer", str(err)) from None
    optimizers = {
        key: build(cfg.trainer[key], f"trainer.{key}") if cfg.trainer.get(key) else None
        for key in _OPTIMIZER_KEYS
    }
    wandb = None
    if cfg.logger.get("wandb"):
        wandb = build(cfg.logger.wandb, "logger.wandb")
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
        wandb=wandb,
        dist=dist,
        seed=int(cfg.seed),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Build and train from a composed config; returns the summary.

    ``output_dir`` defaults to Hydra's run directory; a ``resume`` run continues in the resumed
    run's directory (and also copies its summary into ``output_dir``).
    """
    dist, device = init_distributed(_device(str(cfg.device)))
    seed_everything(int(cfg.seed))
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    resume = cfg.get("resume")
    run_dir = output_dir
    if resume:
        resume_path = Path(str(resume))
        if not resume_path.exists():
            raise ConfigError("resume", f"{resume_path} does not exist")
        run_dir = resume_path if resume_path.is_dir() else resume_path.parent.parent
    trainer = make_trainer(cfg, dist, device, run_dir)
    if resume:
        trainer.resume(resume)
    if dist.is_main:
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    summary = trainer.fit()
    if dist.is_main:
        if run_dir.resolve() != output_dir.resolve():
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
        print(format_summary(summary, run_dir), flush=True)
    return summary


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """The final console table: one row per domain, with any per-domain info columns."""
    info = {k: v for k, v in summary.get("info", {}).items() if isinstance(v, dict)}
    header = ["domain", "weight", *info]
    rows = [
        [name, f"{value:.4f}", *(str(info[k].get(name, "")) for k in info)]
        for name, value in summary["weights"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [
        f"\nlearned domain weights ({summary['solver']}, {summary['steps']} steps, "
        f"{summary['wall_time_s']:.1f} s)",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    test = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("test", {}).items())
    out.append(f"meta loss {summary['meta_loss']:.4f}" + (f" | test {test}" if test else ""))
    if summary.get("skipped_steps"):
        out.append(f"skipped non-finite updates: {summary['skipped_steps']}")
    out.append(f"run directory: {run_dir}")
    return "\n".join(out)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> float:
    try:
        summary = run(cfg)
    except ConfigError as err:
        print(f"bilevel: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"bilevel: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    return float(summary["meta_loss"])


def preflight(args: list[str]) -> str | None:
    """Compose the config for a single run first, so that an unknown group option or key is
    reported as one line (with the valid choices) instead of Hydra's multi-line report.

    Returns the error line, or ``None`` when the config composes (or when the arguments ask for
    something this check does not cover: a sweep, Hydra flags, another config source).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException

    if any(a.startswith("-") for a in args):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        return str(err).splitlines()[0]
    if any(o.is_sweep_override() or o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        return None  # sweeps and extra search paths are Hydra's to check
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            compose("config", overrides=args, return_hydra_config=True)
    except MissingConfigException as err:
        missing = str(err.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        if err.options:
            return f"{group}: unknown option {option!r}; valid: {', '.join(err.options)}"
        return str(err).splitlines()[0]
    except HydraException as err:
        first = str(err).splitlines()[0]
        key = re.match(r"Could not override '([^']+)'", first)
        if key:
            return f"{key.group(1)}: no such config key; to add a new key write +{key.group(1)}=..."
        cause = _root_cause(err)
        return first if cause is err else f"{first} ({str(cause).splitlines()[0]})"
    return None


def main() -> None:
    """Console entry point. Under torchrun, ranks other than 0 keep Hydra's files out of the run
    directory."""
    problem = preflight(sys.argv[1:])
    if problem is not None:
        print(f"bilevel: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        scratch = tempfile.mkdtemp(prefix=f"bilevel-rank{os.environ['RANK']}-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    app()


if __name__ == "__main__":
    main()
