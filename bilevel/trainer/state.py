"""What a trainer checkpoint holds, and the checks made before one is loaded.

A checkpoint holds what continues a run exactly: the trainable part of the model and its
buffers (the frozen rest is recorded by where it came from and a content fingerprint, and
checked on resume instead of saved), the optimizers and schedule, the logits, every RNG and
sampler position, the skip counters, the outer method's own state (warm starts), the step, and
the run's config and overrides (for ``resume=`` without repeating them). Where the model lives
(replicated or sharded) is the strategy's business: it packs and unpacks the model and the
inner optimizer's state. :class:`~bilevel.BilevelTrainer` calls :func:`capture` and
:func:`restore`; nothing here writes a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bilevel.errors import ConfigError, first_line
from bilevel.logging import run_dir as run_dirs
from bilevel.strategies import checkpoint as ckpt

__all__ = ["CHECKPOINT_VERSION", "capture", "checkpoint_keys", "restore", "resume"]

CHECKPOINT_VERSION = 2


def checkpoint_keys(module: nn.Module) -> tuple[set[str], dict[str, Any]]:
    """The state-dict entries a checkpoint holds (trainable parameters and every buffer) and a
    record of the frozen rest (where it came from; its fingerprint is added when first saved)."""
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    keys = {n for n, p in module.named_parameters() if p.requires_grad}
    keys |= {n for n, _ in module.named_buffers()}
    if not frozen:
        return keys, {}
    source = str(getattr(module, "path", None) or type(module).__qualname__)
    return keys, {"source": source, "parameters": len(frozen)}


def capture(trainer: Any) -> dict[str, Any]:
    """The trainer's state as tensors and plain containers (a collective under torchrun: every
    rank takes part, each adding its own RNG and sampler positions)."""
    loop, strategy = trainer.loop, trainer.strategy
    local = {
        "rng": ckpt.capture_rng(),
        "samplers": {
            "train": loop.train_sampler.state_dict(),
            "meta": loop.meta_sampler.state_dict(),
        },
    }
    return {
        "version": CHECKPOINT_VERSION,
        "step": trainer.step,
        "elapsed_s": trainer.elapsed,
        "outer_updates": trainer.outer_updates,
        "names": trainer.names,
        "parametrization": trainer.weights.parametrization,
        "model": strategy.model_state(trainer.module, trainer.trainable_keys),
        "frozen": frozen_record(trainer),
        "weights": trainer.weights.state_dict(),
        "inner_optimizer": strategy.optimizer_state(trainer.module, loop.inner_opt),
        "outer_optimizer": trainer.outer_opt.state_dict(),
        "scheduler": loop.scheduler.state_dict() if loop.scheduler else None,
        "counters": loop.skips.state_dict(),
        "last": dict(loop.last),
        "method": trainer.method.state_dict(),
        "ranks": strategy.gather_objects(local),
        "logger_ids": dict(trainer.logger_ids),
        "world_size": strategy.world_size,
        "config": trainer.run_config,
        "overrides": trainer.overrides,
    }


def frozen_record(trainer: Any) -> dict[str, Any]:
    """Where the frozen parameters came from and their fingerprint ({} when all train); the
    fingerprint is computed once, at the first checkpoint."""
    frozen = trainer.frozen
    if not frozen:
        return {}
    if "fingerprint" not in frozen:
        named = [(n, p) for n, p in trainer.module.named_parameters() if not p.requires_grad]
        local = ckpt.fingerprint(named)
        frozen["fingerprint"] = "+".join(trainer.strategy.gather_objects(local))
    return dict(frozen)


def restore(trainer: Any, state: dict[str, Any]) -> None:
    """Load ``state`` (from :func:`capture`) into ``trainer`` after checking that it was written
    for the same domains, parametrization, world size, model and frozen base; a mismatch is a
    :class:`~bilevel.errors.ConfigError` naming ``resume``."""
    check_compatible(state, trainer)
    frozen = state.get("frozen") or {}
    mine = frozen_record(trainer)
    if frozen.get("fingerprint") != mine.get("fingerprint"):
        raise ConfigError(
            "resume",
            f"the checkpoint was trained on another frozen base model "
            f"({frozen.get('source', 'none')}, fingerprint "
            f"{str(frozen.get('fingerprint'))[:12]}) than this one "
            f"({mine.get('source', 'none')}, {str(mine.get('fingerprint'))[:12]}); resume "
            "with the same model.path",
        )
    loop, strategy, device = trainer.loop, trainer.strategy, trainer.device
    try:
        strategy.restore(
            state, trainer.resume_file, trainer.module, loop.inner_opt, trainer.trainable_keys
        )
    except (RuntimeError, KeyError, ValueError) as err:
        lines = str(err).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line), None)
        raise ConfigError(
            "resume",
            "the checkpoint's model or optimizer does not fit this model "
            f"({detail or first_line(str(err)) or type(err).__name__})",
        ) from None
    trainer.weights.load_state_dict(state["weights"])
    trainer.outer_opt.load_state_dict(state["outer_optimizer"])
    if loop.scheduler is not None and state["scheduler"] is not None:
        loop.scheduler.load_state_dict(state["scheduler"])
    local = state["ranks"][strategy.rank]
    ckpt.restore_rng(local["rng"])
    loop.train_sampler.load_state_dict(local["samplers"]["train"])
    loop.meta_sampler.load_state_dict(local["samplers"]["meta"])
    loop.skips.load_state_dict(state["counters"])
    loop.last = {k: v.to(device) for k, v in state["last"].items()}
    trainer.method.load_state_dict(_to_device(state.get("method") or {}, device))
    trainer.step = int(state["step"])
    trainer.elapsed = float(state["elapsed_s"])
    trainer.outer_updates = int(state.get("outer_updates", 0))
    loop.refresh_weights()
    ids = dict(state.get("logger_ids") or {})
    if state.get("wandb_id") and "wandb" not in ids:  # a checkpoint written before loggers=
        ids["wandb"] = state["wandb_id"]
    trainer.logger_ids = ids


def check_compatible(state: dict[str, Any], trainer: Any) -> None:
    """``ConfigError`` (field ``resume``) when ``state`` was written for other domains, another
    parametrization, another world size or a model without this one's trainable tensors."""
    if list(state["names"]) != trainer.names:
        raise ConfigError(
            "resume",
            f"the checkpoint's domain names {list(state['names'])} differ from "
            f"the config's {trainer.names}",
        )
    if state["parametrization"] != trainer.weights.parametrization:
        raise ConfigError(
            "resume",
            f"the checkpoint's parametrization {state['parametrization']!r} differs "
            f"from the config's {trainer.weights.parametrization!r}",
        )
    if len(state["ranks"]) != trainer.strategy.world_size:
        raise ConfigError(
            "resume",
            f"the checkpoint was written by {len(state['ranks'])} rank(s), this run "
            f"has {trainer.strategy.world_size}",
        )
    missing = trainer.trainable_keys - set(state["model"]) if "shards" not in state else set()
    if missing:
        raise ConfigError(
            "resume",
            f"the checkpoint lacks {len(missing)} trainable tensor(s) of this model "
            f"(e.g. {sorted(missing)[0]}): it was written for another model",
        )


def _to_device(value: Any, device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def resume(trainer: Any, path: Path) -> None:
    """Load the checkpoint of ``path`` (a run directory's ``checkpoints/last.pt``, or a file)
    into ``trainer``, refusing one past ``trainer.steps``; a note when nothing is left to train."""
    file = run_dirs.in_run(path) if path.is_dir() else path
    trainer.resume_file = file
    state = trainer.strategy.load(file)
    steps = trainer.config.steps
    if int(state["step"]) > steps:
        raise ConfigError(
            "trainer.steps",
            f"is {steps} but the checkpoint is at step {state['step']}; "
            "a resumed run can only continue (trainer.steps >= the checkpoint's step)",
        )
    trainer.load_state_dict(state, source=str(path))
    if trainer.step >= steps:
        trainer.notes.append(
            f"the checkpoint is at step {trainer.step} = trainer.steps: there is nothing left "
            f"to train; raise trainer.steps (e.g. trainer.steps={2 * trainer.step}) to continue"
        )
