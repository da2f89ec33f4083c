"""What a run records: the ``metrics.jsonl`` record of a log event, and ``summary.json``.

Both read a built :class:`~bilevel.BilevelTrainer` (passed in; this module sits below the one
that defines it) and change nothing but its notes. The host reads values back here, and only
here: at log events and at the end of the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import fields, is_dataclass
from typing import Any

from bilevel.files import write_text_atomic
from bilevel.logging.jsonl import to_jsonable
from bilevel.logging.provenance import provenance

__all__ = [
    "check_ranks_agree",
    "data_seen",
    "log_record",
    "run_config",
    "write_config",
    "solver_options",
    "summary",
]

log = logging.getLogger("bilevel")
progress = logging.getLogger("bilevel.progress")


def log_record(trainer: Any) -> dict[str, Any]:
    """The record of a log event (weights, losses, skip counts, learning rate, time), written
    to the run's log and shown on the progress bar."""
    check_ranks_agree(trainer)
    weights = trainer.weights.as_dict()
    last = trainer.loop.last
    totals = trainer.loop.skips.totals()
    record: dict[str, Any] = {
        "step": trainer.step,
        "weights": weights,
        "inner_loss": float(last["inner_loss"].item()) if "inner_loss" in last else math.nan,
        "meta_loss": trainer.meta_loss(),
        "domain_loss": (
            dict(zip(trainer.names, last["domain_loss"].tolist())) if "domain_loss" in last else {}
        ),
        **totals,
        "inner_lr": trainer.loop.last_lr,
        "elapsed_s": round(trainer.elapsed, 3),
        **data_seen(trainer),
    }
    trainer.log.write(record)
    if progress.isEnabledFor(logging.INFO):
        progress.info(
            f"step {trainer.step}: inner loss {record['inner_loss']:.4f}, meta loss "
            f"{record['meta_loss']:.4f}, weights "
            + ", ".join(f"{k} {v:.4f}" for k, v in weights.items())
            + (f", skipped {totals['skipped_steps']}" if totals["skipped_steps"] else "")
        )
    shown = dict(list(weights.items())[:6])
    trainer.log.show(
        step=trainer.step, inner=record["inner_loss"], meta=record["meta_loss"], **shown
    )
    return record


def check_ranks_agree(trainer: Any) -> None:
    """At a log event under torchrun: the weights must be the same on every rank (one gather
    of K numbers). A method that updates them from one rank's own batches made them drift apart
    with nothing said until the summary; the first time, a note says so."""
    strategy = trainer.strategy
    if strategy.world_size == 1 or trainer._ranks_differ_said:
        return
    if not strategy.all_equal(trainer.weights.logits.detach()):
        trainer._ranks_differ_said = True
        note = (
            f"the weights differ between ranks at step {trainer.step}: the method "
            f"{trainer.method.name!r} updates them from each rank's own batches instead of "
            "an average over ranks (the summary records ranks_agree=false)"
        )
        trainer.notes.append(note)
        if strategy.is_main:
            log.warning(f"note: {note}")


def summary(
    trainer: Any, test: dict[str, float], val: dict[str, float] | None = None
) -> dict[str, Any]:
    """``summary.json``: the final weights and meta loss, the ``test`` metrics, and what the
    run was (steps, method and its options, layout, seed, the data's info, every note)."""
    strategy, loop = trainer.strategy, trainer.loop
    agree = strategy.all_equal(trainer.weights.logits.detach())
    out = {
        "weights": trainer.weights.as_dict(),
        "meta_loss": trainer.meta_loss(),
        "test": test,
        **({"val": val} if val else {}),
        "steps": trainer.step,
        "outer_updates": trainer.outer_updates,
        "wall_time_s": round(trainer.elapsed, 3),
        "solver": trainer.method.name,
        "solver_options": solver_options(trainer.solver),
        "learn_weights": trainer.config.learn_weights,
        # false for a method that reweights examples and keeps the domain weights as set
        "moves_weights": bool(getattr(trainer.method, "moves_weights", True)),
        "parametrization": trainer.weights.parametrization,
        **loop.skips.totals(),
        "strategy": strategy.name,
        "world_size": strategy.world_size,
        "ranks_agree": bool(agree),
        "parameter_elements": sum(p.numel() for p in loop.params),
        "parameter_elements_per_rank": sum(strategy.local(p).numel() for p in loop.params),
        "seed": trainer.seed,
        **data_seen(trainer, final=True),
        "info": trainer.data.info,
        "notes": list(trainer.notes),
        "status": "finished",
        "provenance": provenance(trainer.device),
    }
    if trainer._resumed_from:
        out["resumed_from"] = trainer._resumed_from
    return out


def data_seen(trainer: Any, final: bool = False) -> dict[str, Any]:
    """For domains read from disk: the tokens and documents trained on so far per domain
    (summed over ranks: a collective), the effective mixture (each domain's share of those
    tokens) and the epochs (tokens seen over the domain's size); at the end also the rows
    skipped as bad and the tokens dropped at block ends. ``{}`` for data in memory."""
    seen = getattr(trainer.loop.train_sampler, "seen", None)
    if not callable(seen):
        return {}
    per_rank = trainer.strategy.gather_objects(seen())
    total = {
        key: [sum(r[key][k] for r in per_rank) for k in range(trainer.k)] for key in per_rank[0]
    }
    names = trainer.names
    tokens = total["tokens"]
    all_tokens = sum(tokens)
    sizes = trainer.data.domain_sizes()
    out: dict[str, Any] = {
        "tokens_seen": dict(zip(names, tokens, strict=True)),
        "mixture": {n: (t / all_tokens if all_tokens else 0.0) for n, t in zip(names, tokens)},
        "epochs": {n: round(t / max(1, s), 4) for n, t, s in zip(names, tokens, sizes)},
    }
    if any(getattr(s, "kind", "") == "blocks" for s in trainer.loop.train_sampler.streams):
        out["documents_seen"] = dict(zip(names, total["documents"], strict=True))
    if final:
        out["bad_rows"] = dict(zip(names, total["bad_rows"], strict=True))
        out["tokens_dropped"] = dict(zip(names, total["dropped"], strict=True))
    return out


def solver_options(solver: Any) -> dict[str, Any]:
    """A dataclass solver's options (its configuration), ``{}`` for another object."""
    if is_dataclass(solver):
        return {
            f.name: getattr(solver, f.name)
            for f in fields(solver)
            if f.name != "name" and not f.name.startswith("_")
        }
    return {}


def _name(obj: Any) -> str | None:
    """What an object given to the trainer is, for a person reading the run later."""
    if obj is None:
        return None
    target = getattr(obj, "func", obj)  # a functools.partial names its function
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


def run_config(trainer: Any) -> dict[str, Any]:
    """The run's configuration as ``config.json`` keeps it: the resolved CLI config when the
    run came from one, else what the Python call was given (the trainer settings, the solver
    and its options, the weights at the start, the model, losses and optimizers by name), so
    that an API run's folder says how it was made as a CLI run's ``.hydra/`` does."""
    if trainer.run_config:
        return dict(trainer.run_config)
    settings = {f.name: getattr(trainer.config, f.name) for f in fields(trainer.config)}
    return {
        "source": "python",
        "trainer": settings,
        "solver": {"name": trainer.method.name, **solver_options(trainer.solver)},
        "weights": {
            "class": _name(trainer.weights),
            "parametrization": trainer.weights.parametrization,
            "init": trainer.weights.as_dict(),
        },
        "domains": list(trainer.names),
        "model": _name(trainer.module),
        "inner_loss": _name(trainer.inner_loss),
        "outer_loss": _name(trainer.outer_loss),
        **{
            k: _name(v) or ("none" if k == "inner_scheduler" else "default")
            for k, v in trainer.factories.items()
        },
        "seed": trainer.seed,
        "world_size": trainer.strategy.world_size,
    }


def write_config(trainer: Any) -> None:
    """``<run dir>/config.json`` (:func:`run_config`), written by the main rank at step 0."""
    if trainer.run_dir is not None and trainer.strategy.is_main:
        text = json.dumps(to_jsonable(run_config(trainer)), indent=2, default=str)
        write_text_atomic(trainer.run_dir / "config.json", text + "\n")
