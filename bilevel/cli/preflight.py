"""What the command line is checked for before the Hydra app runs.

Hydra reports a config that does not compose (an unknown option, a misspelt key, a key of
another option of its group) in several lines, and only once the app would start; here the
config is composed first, at every point of a sweep that can compose differently, and each
mistake becomes one line with what to write instead. ``--cfg job`` with ``resume=`` is answered
here too: with the config the resumed run would continue with, not the defaults.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bilevel.cli import folders
from bilevel.cli.resume import continue_from, harmless, override_key, refused_on_resume
from bilevel.errors import first_line

__all__ = ["config_dir", "open_domain_keys", "preflight", "resumed_config_shown", "root_cause"]


def open_domain_keys(args: list[str]) -> list[str]:
    """``data.domains.<name>=<glob>`` as Hydra takes it: ``++data.domains.<name>=...`` (add
    the key, or set it where a preset already has it). The corpus presets leave
    ``data.domains`` empty for the user to fill, one domain per override; without the ``++``
    Hydra refused each with "Key 'news' is not in struct"."""
    out = []
    for arg in args:
        if re.match(r"data\.domains\.[^=]+=", arg):
            arg = "++" + arg
        out.append(arg)
    return out


def config_dir() -> str:
    """``$BILEVEL_CONFIG_DIR`` or the repository's ``configs/`` next to the package."""
    candidates = [
        os.environ.get("BILEVEL_CONFIG_DIR"),
        Path(__file__).resolve().parents[2] / "configs",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return str(Path(candidate).resolve())
    raise SystemExit(
        "bilevel: cannot find the configs/ folder; install the repository with "
        "`pip install -e .` or set BILEVEL_CONFIG_DIR"
    )


def root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def resumed_config_shown(args: list[str]) -> str | None:
    """``--cfg job`` with ``resume=``: the config the resumed run would continue with (the
    one saved in its checkpoint plus the harmless overrides given), not the defaults that
    Hydra would compose and print; ``None`` for any other command."""
    plain, asked, rest = [], None, iter(args)
    for arg in rest:
        if arg in ("--cfg", "-c"):
            asked = next(rest, None)
        elif arg.startswith("--cfg="):
            asked = arg.partition("=")[2]
        elif arg == "--resolve":
            continue
        elif arg.startswith("-"):
            return None  # another Hydra flag: Hydra's to answer
        else:
            plain.append(arg)
    resume = [folders.override_value(a) for a in plain if override_key(a) == "resume"]
    if asked != "job" or not resume or not resume[-1]:
        return None
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=plain)
    own = [a for a in plain if override_key(a) != "resume"]
    *_, merged = continue_from(resume[-1], own, cfg, config_dir())
    return (
        f"# the config resume={resume[-1]} continues with: the run's own (saved in its "
        "checkpoint) and the harmless overrides given\n" + OmegaConf.to_yaml(merged)
    )


def preflight(args: list[str]) -> tuple[str | None, dict[str, Any] | None]:
    """Compose the config first, so that an unknown group option or key is reported as one
    line (with the valid choices) instead of Hydra's multi-line report. A sweep (``-m``) is
    composed at its points that can differ in what they compose: every key at its first
    value, and each other value of a group or top-level key (``solver=cg,newton``).

    Returns the error line, or ``None`` when the config composes (or when the arguments ask for
    something this check does not cover: Hydra flags other than ``-m``, sweeps over intervals
    or globs, another config source); and the composed ``hydra`` node (unresolved) of a run
    that is not a ``-m`` sweep, ``None`` where nothing was composed for it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for arg in args:  # counts of an Optuna sweep: 0 ends in Optuna's traceback
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.sweeper.n_trials", "hydra.sweeper.n_jobs"):
            if not (value.isdigit() and int(value) >= 1):
                return f"{key.lstrip('+')}: must be an integer >= 1, got {value!r}", None
    flags = {a for a in args if a.startswith("-")}
    if not flags <= set(folders.MULTIRUN_FLAGS):
        return None, None
    plain = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as err:
        return first_line(str(err)), None
    if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        return None, None  # another config source: Hydra's to check
    swept = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
    if not flags and not swept:
        return _compose_check(plain)
    try:
        values = {i: list(parsed[i].sweep_string_iterator()) for i in swept}
    except HydraException:
        return None, None  # an interval or glob sweep (Optuna's search space)
    first = list(plain)
    for i in swept:
        first[i] = f"{parsed[i].get_key_element()}={values[i][0]}"
    if not flags:  # a sweep without -m: fine where the config is a multirun (hparams_search)
        error, hydra = _compose_check(first)
        mode = (hydra or {}).get("mode")
        if error is not None or getattr(mode, "name", mode) == "MULTIRUN":
            return error, None
        shown = plain[swept[0]]  # Hydra: "Ambiguous value ..." or "... requires --multirun"
        return (
            f"{parsed[swept[0]].get_key_element()}: {shown} is a sweep (several values), which "
            f"runs only as a multirun: bilevel-run -m {shown} (quote a single value that "
            "holds a comma: key='a,b')"
        ), None
    points = [first]
    for i in swept:
        if "." not in parsed[i].get_key_element():  # a group: each option composes differently
            points += [
                [*first[:i], f"{parsed[i].get_key_element()}={v}", *first[i + 1 :]]
                for v in values[i][1:10]
            ]
    for point in points:
        error, _ = _compose_check(point)
        if error is not None:
            return error, None
    return None, None


def _compose_check(args: list[str]) -> tuple[str | None, dict[str, Any] | None]:
    """Compose the config with ``args``: the one-line error (``None``: it composes) and the
    composed ``hydra`` node, unresolved (``None`` on an error)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            composed = compose("config", overrides=args, return_hydra_config=True)
    except MissingConfigException as err:
        missing = str(err.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        if err.options:
            return f"{group}: unknown option {option!r}; valid: {', '.join(err.options)}", None
        return first_line(str(err)), None
    except (ValueError, TypeError) as err:  # e.g. trainer=null: Hydra's own ValueError
        return first_line(str(err)), None
    except HydraException as err:
        first = first_line(str(err))
        key = re.match(r"Could not override '([^']+)'", first)
        if key:
            name = key.group(1)
            if any(a.startswith("resume=") for a in args) and not harmless(name):
                # the key may exist in the resumed run's config; either way it is refused there
                return f"resume: {refused_on_resume([name])}", None
            others = _composed([a for a in args if override_key(a) != name])
            elsewhere = _key_elsewhere(name, others)
            close = _close_keys(name, others)
            if close and " belongs to " not in elsewhere:  # another option's key comes first
                hint = f"did you mean {' or '.join(close)}? "
                return f"{name}: no such config key; {hint}to add a new key write +{name}=...", None
            return f"{name}: {elsewhere}", None
        taken = re.match(r"Could not append to config\. An item is already at '([^']+)'", first)
        if taken:  # +key=value for a key the config already has
            name = taken.group(1)
            given = next((a for a in args if override_key(a) == name and a.startswith("+")), None)
            value = given.partition("=")[2] if given else "..."
            return (
                f"{name}: the config already has this key, so '+' (add a new key) does not "
                f"apply: set it with {name}={value}"
            ), None
        cause = root_cause(err)
        return (first if cause is err else f"{first} ({first_line(str(cause))})"), None
    return None, OmegaConf.to_container(composed.hydra, resolve=False)


def _composed(args: list[str]) -> DictConfig | None:
    """The config ``args`` compose (with Hydra's node), for the hints of an unknown key; ``None``
    where they do not compose (a hint only: without it the line is still right)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            return compose("config", overrides=args, return_hydra_config=True)
    except Exception:  # noqa: BLE001
        return None


def _key_elsewhere(name: str, cfg: DictConfig | None) -> str:
    """Why ``name`` is not a key of ``cfg`` (the config without it), for a key of a config
    group's option: the option chosen has no such key (its keys), and which other options of
    the group have it (``solver.alpha`` belongs to neumann and scalebio, not to cg);
    ``+name=...`` would only pass the key to a component that does not take it."""
    parts = name.split(".")
    root = Path(config_dir())
    split = next(
        (i for i in range(len(parts) - 1, 0, -1) if (root / "/".join(parts[:i])).is_dir()), None
    )
    plain = "no such config key; to add a new key write +" + name + "=..."
    if cfg is None or split is None or parts[0] in ("experiment", "hydra", "hparams_search"):
        return plain
    group, rest = "/".join(parts[:split]), ".".join(parts[split:])
    chosen = cfg.hydra.runtime.choices.get(group)
    node = OmegaConf.select(cfg, ".".join(parts[:split]))
    keys = [str(k) for k in node.keys() if not str(k).startswith("_")] if node else []
    having = sorted(
        f.stem for f in (root / group).glob("*.yaml") if f.stem != chosen and _has_key(f, rest)
    )
    field = group.replace("/", ".")
    said = (
        f"{group}={chosen} has no key {rest!r} (its keys: {', '.join(keys) or 'none'})"
        if chosen
        else f"no option of {group} is chosen"
    )
    if having:
        return f"{said}; {rest} belongs to {field} {', '.join(having)}: choose one ({group}=...)"
    return f"{said}; to pass a new key to its component write +{name}=..."


def _has_key(file: Path, dotted: str) -> bool:
    """Whether the config file ``file`` sets the key ``dotted`` (read, not resolved: its
    interpolations may point into other groups)."""
    try:
        node: Any = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    except Exception:  # noqa: BLE001 - a hint only
        return False
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _close_keys(name: str, cfg: DictConfig | None) -> list[str]:
    """Keys of ``cfg`` (the config without the bad override) that look like ``name``."""
    if cfg is None:
        return []
    parent, _, leaf = name.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    keys = [str(k) for k in node.keys() if parent or k != "hydra"]  # the app's keys, not Hydra's
    close = difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6)
    return [f"{parent}.{c}" if parent else c for c in close]
