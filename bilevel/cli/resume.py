"""What a resumed run continues with: its saved config, plus only the harmless overrides.

``bilevel-run resume=<run dir>`` must continue the same run without the user repeating its
overrides, and must not silently train something else. The run's original overrides are kept
in its checkpoint; composing them with and without the new ones shows which keys the new ones
change (also through interpolations, e.g. a cosine schedule's ``T_max: ${trainer.steps}``).
Keys that change how the run is watched (logging, progress, evaluation and checkpoint cadence,
device) and a larger ``trainer.steps`` are applied to the saved config; any other is refused
with one line naming it (:class:`~bilevel.errors.ConfigError`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bilevel.errors import ConfigError
from bilevel.logging import run_dir as run_dirs
from bilevel.strategies import checkpoint

__all__ = [
    "RESUME_HARMLESS",
    "continue_from",
    "harmless",
    "override_key",
    "refused_on_resume",
    "resumed_config",
]

log = logging.getLogger("bilevel")

#: overrides a resumed run accepts: they change how the run is watched, not what it trains
RESUME_HARMLESS = (
    "logger",
    "trainer.progress",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.checkpoint_seconds",
    "trainer.max_skipped",
    "device",
    "print_config",
    "resume",
    "trainer.steps",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _compose(overrides: list[str], configs: str) -> dict[str, Any]:
    """The resolved config that ``overrides`` make (Hydra's own compose, initialized on
    ``configs`` unless the app already is)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_dir(configs, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def override_key(override: str) -> str:
    """The key an override sets: ``trainer.steps`` for ``+trainer.steps=80``."""
    return override.lstrip("+~").split("=", 1)[0]


def harmless(key: str) -> bool:
    """Whether a resumed run accepts a change of ``key`` (see :data:`RESUME_HARMLESS`)."""
    return any(key == h or key.startswith(h + ".") for h in RESUME_HARMLESS)


def refused_on_resume(keys: list[str]) -> str:
    shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
    return (
        f"these overrides would change what the run trains: {shown}; a resumed run accepts "
        "only trainer.steps (to extend it), logging, progress, evaluation and checkpoint "
        "cadence and device (start a new run to change anything else)"
    )


def resumed_config(
    state: dict[str, Any], new_overrides: list[str], current: DictConfig, configs: str
) -> DictConfig:
    """The config a resumed run continues with: the one saved in its checkpoint, plus the
    harmless changes that ``new_overrides`` make. Overrides that change what is trained are
    refused with one line naming them. ``configs``: the folder the app composes from."""
    saved = state.get("config")
    if not saved:  # a checkpoint from before configs were saved: trust the command line
        log.warning("the checkpoint holds no saved config: using this command's config as is")
        return current
    from hydra.errors import HydraException

    old_overrides = list(state.get("overrides") or [])
    before = _flatten(_compose(old_overrides, configs))
    try:
        after = _flatten(_compose([*old_overrides, *new_overrides], configs))
    except HydraException:
        # the new overrides do not even compose with the run's own (e.g. another solver
        # whose keys differ): every one that is not harmless changes what is trained
        after = None
    if after is None:
        refused = [o for o in new_overrides if not harmless(override_key(o))]
        changed = []
    else:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        refused = [k for k in changed if not harmless(k)]
    if refused:
        # a group choice (trainer/inner_scheduler=cosine) names the keys under its path
        named = {override_key(o).replace("/", ".") for o in new_overrides}
        derived = [k for k in refused if not any(k == n or k.startswith(n + ".") for n in named)]
        why = ""
        if derived:  # e.g. a cosine schedule's T_max: ${trainer.steps}

            def moves(override: str) -> bool:
                try:
                    alone = _flatten(_compose([*old_overrides, override], configs))
                except HydraException:  # it composes only with the others: not named
                    return False
                return any(alone.get(k) != before.get(k) for k in derived)

            causes = [
                override_key(o) for o in new_overrides if override_key(o) != "resume" and moves(o)
            ]
            length = (
                ": a setting tied to the run's length cannot be extended"
                if "trainer.steps" in causes
                else ""
            )
            # a group choice (experiment=digits) sets them through its preset's file
            groups = [c for c in causes if os.path.isdir(os.path.join(configs, c))]
            how = (
                (
                    "which sets them in its preset file"
                    if len(causes) == 1
                    else "which set them in their preset files"
                )
                if causes and len(groups) == len(causes)
                else "through an interpolation in the config"
            )
            why = (
                f" ({', '.join(derived)} follow{'s' if len(derived) == 1 else ''} from "
                f"{', '.join(causes) or 'the overrides'}, {how}{length})"
            )
        raise ConfigError("resume", refused_on_resume(refused) + why)
    merged = OmegaConf.create(saved)
    for key in changed:
        if key in after:
            OmegaConf.update(merged, key, after[key], force_add=True)
    OmegaConf.update(merged, "resume", current.get("resume"), force_add=True)
    return merged


def continue_from(
    resume: str, new_overrides: list[str], current: DictConfig, configs: str
) -> tuple[Any, Any, dict[str, Any], DictConfig]:
    """``resume=<path>`` read: ``(checkpoint file, the run directory it belongs to or None,
    the checkpoint, the config the run continues with)``. One place for the run itself and
    for ``--cfg job``, so that what is shown is what runs."""
    file, resumed_dir = run_dirs.resolve_resume(resume)
    state = checkpoint.load(file)
    return file, resumed_dir, state, resumed_config(state, new_overrides, current, configs)
