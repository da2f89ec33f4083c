"""What a run says in its first lines (``note: ...``): settings that run but deserve a word.

A batch too small for every window to see every domain, a meta batch or a run too short for
the outer steps meant, and settings that change nothing for the chosen method or model. Each
function reads a built :class:`~bilevel.BilevelTrainer` and returns its notes; none changes it.
One note comes at the end instead (:func:`unmoved`): a run whose hypergradient was zero in
every outer update learned nothing, which no setting predicts. ``summary.json`` keeps them all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["outer_skipped", "sampling", "schedule", "settings", "solver_notes", "unmoved"]


def sampling(trainer: Any) -> list[str]:
    """Say when a batch is too small for each hypergradient to see every domain."""
    if not getattr(trainer.method, "uses_meta", True):
        return []
    sampler = trainer.loop.train_sampler
    counts = sampler.expected_counts(uniform=trainer.loop.applies_weights)
    few = [(n, c) for n, c in zip(trainer.names, counts) if 0 < c < 1]
    if not few:
        return []
    shown = ", ".join(f"{n} {c:.2g}" for n, c in few[:6])
    need = math.ceil(max(1 / c for _, c in few) * sampler.batch_size * trainer.strategy.world_size)
    return [
        f"trainer.batch_size={trainer.config.batch_size} gives fewer than one row per batch, "
        f"on average, to {len(few)} domain(s) ({shown} rows): a hypergradient sees only the "
        f"domains its batch drew (each is drawn in a fraction of the batches equal to its "
        f"expected rows, never starved); batch_size >= {need} lets every window see every "
        f"domain"
    ]


def schedule(trainer: Any) -> list[str]:
    """Say when the meta batch or the run's length make the outer steps other than meant."""
    notes = []
    config = trainer.config
    meta = trainer.loop.meta_sampler
    if meta.batch_size is not None and meta.batch_size * trainer.strategy.world_size > meta.n:
        notes.append(
            f"trainer.meta_batch_size={config.meta_batch_size} is larger than the "
            f"meta set ({meta.n} rows): each meta batch draws rows with replacement, "
            "noisier and slower than the whole set (trainer.meta_batch_size=null)"
        )
    weights = trainer.weights
    if _single_simplex(weights):
        notes.append(
            f"one domain ({weights.names[0]}) on the simplex: its weight is 1 whatever "
            "the hypergradient, so nothing is learned (train on several domains, or "
            "trainer.learn_weights=false)"
        )
    if config.steps < config.outer_every:
        notes.append(
            f"trainer.steps={config.steps} is shorter than one window "
            f"(trainer.outer_every={config.outer_every}): no outer step runs, and "
            "the weights keep their initial values"
        )
    return notes


def settings(trainer: Any, outer_optimizer_given: bool, differentiates: bool) -> list[str]:
    """Settings that run but change nothing, or not what they seem to (for every run, learned
    weights or not). ``outer_optimizer_given``: an outer optimizer was passed in Python;
    ``differentiates``: the method reads the meta set for its outer steps."""
    notes = []
    config, method = trainer.config, trainer.method
    train = trainer.loop.train_sampler
    if train.batch_size * trainer.strategy.world_size > train.n:
        notes.append(
            f"trainer.batch_size={config.batch_size} is larger than the training set "
            f"({train.n} rows): rows repeat within every batch (each domain's rows are "
            "drawn with replacement)"
        )
    world = trainer.strategy.world_size
    for name in ("batch_size", "meta_batch_size"):
        value = getattr(config, name)
        if world > 1 and value is not None and value % world:
            each = max(1, value // world)
            notes.append(
                f"trainer.{name}={value} is not a multiple of the {world} ranks: each rank "
                f"draws {each} rows, {each * world} in all"
            )
    if config.learn_weights and not getattr(method, "uses_outer_optimizer", True):
        chosen = (
            any(_names_outer_optimizer(o) for o in trainer.overrides)
            if trainer.run_config  # the command line: what the user wrote, not the default
            else outer_optimizer_given
        )
        if chosen:
            rule = (
                "sets the weights by its own rule (its step size is a solver option)"
                if getattr(method, "moves_weights", True)
                else "does not move the domain weights"
            )
            notes.append(
                f"trainer.outer_optimizer has no effect on solver={method.name}: it {rule}"
            )
    half = sorted(
        {str(p.dtype).removeprefix("torch.") for p in trainer.loop.params} & {"float16", "bfloat16"}
    )
    if half:
        notes.append(
            f"the model's trainable parameters are {' and '.join(half)}: with no float32 copy, "
            "an inner step smaller than half their last digit is rounded away (a bfloat16 MLP "
            "on a small noisy_domains problem stayed at test accuracy 0.22 where float32 reached "
            "0.77); keep the model float32 and use trainer.precision=bf16 (autocast) instead"
        )
    floating = {p.dtype for p in trainer.module.parameters() if p.is_floating_point()}
    if config.precision == "bf16" and floating == {torch.float64}:
        notes.append(
            "trainer.precision=bf16 has no effect on a float64 model: autocast leaves "
            "float64 operations in float64"
        )
    if (
        config.temperature != 1.0
        and config.sampling != "temperature"
        and _set_by_user(trainer, "temperature")
    ):
        notes.append(
            f"trainer.temperature={config.temperature} has no effect with "
            f"trainer.sampling={config.sampling} (it shapes sampling=temperature's shares)"
        )
    if (
        config.meta_batch_size is not None
        and not (config.learn_weights and differentiates)
        and _set_by_user(trainer, "meta_batch_size")
    ):
        why = (
            "trainer.learn_weights=false runs no outer step"
            if not config.learn_weights
            else f"{method.name} does not read the meta set"
        )
        notes.append(f"trainer.meta_batch_size={config.meta_batch_size} has no effect: {why}")
    if config.inner_lr is not None and _set_by_user(trainer, "inner_lr"):
        why = (
            "trainer.learn_weights=false runs no outer step"
            if not config.learn_weights
            else f"{method.name} computes no hypergradient"
            if not differentiates
            else getattr(method, "inner_lr_unused", None)
        )
        if why:
            notes.append(f"trainer.inner_lr={config.inner_lr} has no effect: {why}")
    if (
        config.hessian_batch == "independent"
        and not getattr(method, "uses_hessian", False)
        and _set_by_user(trainer, "hessian_batch")
    ):
        notes.append(
            f"trainer.hessian_batch=independent has no effect on {method.name} (it "
            "uses no Hessian-vector products)"
        )
    if config.eval_every and trainer.data.test is None and trainer.data.val is None:
        notes.append(
            f"trainer.eval_every={config.eval_every} has no effect: the data has no test (or "
            "val) set to score"
        )
    if config.checkpoint_every and trainer.run_dir is None:
        notes.append(
            f"trainer.checkpoint_every={config.checkpoint_every} has no effect: the run has no "
            "run_dir to write checkpoints into"
        )
    return notes


def _set_by_user(trainer: Any, key: str) -> bool:
    """Whether the user chose ``trainer.<key>``: always in Python (a TrainerConfig field set
    by hand); on the command line only when an override names it. A value that an experiment
    preset set for its own method (prm's ``inner_lr`` for first_order) is no setting of the
    user's: a note that it changes nothing under ``trainer.learn_weights=false`` or another
    solver would be noise they cannot act on."""
    if not trainer.run_config:
        return True
    return any(o.lstrip("+~").split("=", 1)[0] == f"trainer.{key}" for o in trainer.overrides)


def _names_outer_optimizer(override: str) -> bool:
    """Whether a command-line override chooses or sets the outer optimizer."""
    return override.lstrip("+~").startswith(("trainer.outer_optimizer", "trainer/outer_optimizer"))


def _single_simplex(weights: Any) -> bool:
    """One domain on the simplex: its weight is 1, its logit's gradient always exactly 0."""
    return len(weights.names) == 1 and weights.parametrization == "softmax"


def unmoved(updates: int, nonzero: int, weights: Any = None) -> str | None:
    """The note for a run whose ``updates`` gradient steps of the weights all had an exactly
    zero gradient (``nonzero == 0``): the outer loss is flat in the model on the meta set, so
    the weights kept their initial values; ``None`` otherwise, and for one domain on the
    simplex (``weights``), whose zero gradient the first lines already explained."""
    if weights is not None and _single_simplex(weights):
        return None
    if updates == 0 or nonzero > 0:
        return None
    return (
        f"the hypergradient was exactly zero in all {updates} outer updates, so the weights "
        "never moved from weights.init: the outer loss does not change with the model on the "
        "meta set (e.g. a ranking loss whose meta set has no problem with both a right and a "
        "wrong solution, as with data.meta_candidates=1)"
    )


def solver_notes(solver: object) -> list[str]:
    """The solver's own end-of-run notes (e.g. a Neumann series that diverged); solvers may
    offer them through a ``notes()`` method."""
    read = getattr(solver, "notes", None)
    return list(read()) if callable(read) else []


#: how a stop on non-finite values ends: the checkpoint is there to inspect, but a resume keeps
#: the settings that led to the stop (only harmless overrides are accepted on resume)
CHECKPOINT_KEPT = (
    "checkpoint written (resume= keeps the run's settings: to change them, start a new run)"
)


def outer_skipped(trainer: Any, count: int) -> str:
    """Why a run stops (exit 3) after ``count`` outer updates in a row were skipped: the
    solver's own word where it has one, else a meta loss that is not finite, else a
    hypergradient that is not finite or overflows (and what usually causes that)."""
    said = solver_notes(trainer.solver)
    meta = trainer.loop.last.get("meta_value")
    if said:
        what = f": {'; '.join(said)}"
    elif meta is not None and not bool(torch.isfinite(meta)):
        what = (
            f", the meta loss is not finite ({float(meta)}): check the meta set (data.meta) "
            "and the outer loss"
        )
    else:
        what = (
            ", the hypergradient is not finite, or so large that its square overflows "
            "(a diverging solver: neumann needs solver.alpha < 2 / the largest Hessian "
            "eigenvalue; a trainer.inner_lr far too large; or a diverging inner training: "
            "lower trainer.inner_optimizer.lr)"
        )
    return (
        f"stopped at step {trainer.step}: {count} consecutive outer updates were skipped"
        f"{what}; {CHECKPOINT_KEPT}"
    )
