"""``TrainerConfig``: the loop settings of :class:`~bilevel.BilevelTrainer` (the ``trainer``
config group without its optimizers), checked before any training."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from bilevel.data.samplers import SAMPLING
from bilevel.errors import ConfigError, is_bool, is_finite_number, is_integer

__all__ = ["TrainerConfig"]


@dataclass
class TrainerConfig:
    """Loop settings (the ``trainer`` config group, minus the optimizers).

    Attributes:
        steps: total inner optimizer steps.
        outer_every: inner steps per outer (weight) update.
        batch_size: training examples per inner step (all ranks together).
        meta_batch_size: meta examples per hypergradient; ``None`` uses the whole meta set.
        sampling: how a batch splits over domains: ``uniform`` | ``size`` (shuffled union) |
            ``weights`` (the current weights) | ``temperature`` (shares ~ size^(1/T)); see
            :mod:`bilevel.data.samplers`.
        temperature: T of ``sampling=temperature``.
        log_every: inner steps between log events (the only regular host reads).
        checkpoint_every: inner steps between checkpoints (0: only at the end). With a
            positive value, a first checkpoint is also written after the first window, and
            another whenever ``checkpoint_seconds`` have passed since the last one.
        checkpoint_seconds: wall-clock seconds between checkpoints (0: by steps only).
        eval_every: inner steps between test-set evaluations (0: only at the end).
        max_skipped: consecutive non-finite updates after which the run stops.
        precision: ``fp32`` or ``bf16`` (autocast of the forward passes; hypergradient math and
            weights stay float32).
        inner_lr: the step size the hypergradient *assumes* for an inner step (first_order's
            H^-1 ~ inner_lr I, sama's fallback); ``None`` uses the learning rate of the last inner
            step the optimizer actually took. It never changes how the model is trained (the
            inner optimizer and its scheduler do that, in every path), and ``unrolled`` does not
            use it: it differentiates the real steps.
        hessian_batch: ``same`` (H and J_L from the window's last batch) or ``independent``
            (H from a second batch, one more forward/backward per outer step). It removes the
            correlation of the two factors but not the bias of inverting a noisy H, which is the
            larger one on the measured problem (docs: Long runs;
            ``scripts/benchmarks/bench_hessian_batch.py``): a check of a run's sensitivity, not
            a cure.
        strategy: ``ddp`` (replicated model; one process without torchrun) or ``fsdp`` (FSDP2
            sharding under torchrun; finite-difference products).
        learn_weights: ``False`` keeps the weights at their initial values (the fixed-weight
            baseline: the same loop without hypergradients).
        progress: show a progress bar.
        cache_prefix: compute the model's frozen prefix once per example before training and
            train on its outputs (:func:`bilevel.data.cache_prefix`: a model with
            ``prefix(x)``, e.g. ``HFClassifier(frozen_layers=k)`` or ``SplitModel``).
        prefix_cache_dir: a folder that keeps the cached prefix across runs, one file per
            split named by the hash of the prefix's parameters and the split's inputs (a sweep
            on the same data computes it once); ``None`` keeps it in memory for the run only.
    """

    steps: int = 1000
    outer_every: int = 5
    batch_size: int = 128
    meta_batch_size: int | None = None
    sampling: str = "uniform"
    temperature: float = 1.0
    log_every: int = 50
    checkpoint_every: int = 0
    checkpoint_seconds: float = 300.0
    eval_every: int = 0
    max_skipped: int = 20
    precision: str = "fp32"
    inner_lr: float | None = None
    hessian_batch: str = "same"
    strategy: str = "ddp"
    learn_weights: bool = True
    progress: bool = True
    cache_prefix: bool = False
    prefix_cache_dir: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainerConfig:
        """``TrainerConfig(**values)``; a key it does not have is one line naming the closest
        settings (it was Python's "__init__() got an unexpected keyword argument")."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=2)
                hint = (
                    f"did you mean {' or '.join(close)}?"
                    if close
                    else f"its settings: {', '.join(known)}"
                )
                raise ConfigError(f"trainer.{key}", f"no such setting; {hint}")
        return cls(**values)

    def validate(self) -> None:
        positive = ["steps", "outer_every", "batch_size", "log_every", "max_skipped"]
        for name in positive:
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ConfigError(f"trainer.{name}", f"must be an integer >= 1, got {value!r}")
        for name in ["checkpoint_every", "eval_every"]:
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ConfigError(f"trainer.{name}", f"must be an integer >= 0, got {value!r}")
        if self.meta_batch_size is not None and not (
            is_integer(self.meta_batch_size) and self.meta_batch_size >= 1
        ):
            raise ConfigError(
                "trainer.meta_batch_size",
                f"must be an integer >= 1 or null (whole meta set), got {self.meta_batch_size!r}",
            )
        for name in ("learn_weights", "progress", "cache_prefix"):
            if not is_bool(getattr(self, name)):
                raise ConfigError(
                    f"trainer.{name}", f"must be true or false, got {getattr(self, name)!r}"
                )
        if self.prefix_cache_dir is not None and not (
            isinstance(self.prefix_cache_dir, str) and self.prefix_cache_dir.strip()
        ):
            raise ConfigError(
                "trainer.prefix_cache_dir",
                f"must be a folder path or null, got {self.prefix_cache_dir!r}",
            )
        if self.prefix_cache_dir is not None and not self.cache_prefix:
            raise ConfigError(
                "trainer.prefix_cache_dir",
                "keeps the cached prefix across runs: it needs trainer.cache_prefix=true",
            )
        if self.sampling not in SAMPLING:
            raise ConfigError("trainer.sampling", f"must be one of {', '.join(SAMPLING)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("trainer.precision", f"must be fp32 or bf16, got {self.precision!r}")
        if self.inner_lr is not None and not (
            is_finite_number(self.inner_lr) and self.inner_lr > 0
        ):
            raise ConfigError(
                "trainer.inner_lr", f"must be a finite number > 0 or null, got {self.inner_lr!r}"
            )
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ConfigError(
                "trainer.temperature", f"must be a finite number > 0, got {self.temperature!r}"
            )
        if not (is_finite_number(self.checkpoint_seconds) and self.checkpoint_seconds >= 0):
            raise ConfigError(
                "trainer.checkpoint_seconds",
                f"must be a finite number >= 0, got {self.checkpoint_seconds!r}",
            )
        if self.hessian_batch not in ("same", "independent"):
            raise ConfigError(
                "trainer.hessian_batch",
                f"must be same or independent, got {self.hessian_batch!r}",
            )
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError("trainer.strategy", f"must be ddp or fsdp, got {self.strategy!r}")
        if self.sampling == "temperature" and self.learn_weights:
            raise ConfigError(
                "trainer.sampling",
                "temperature sampling is a fixed mixture (the sampler applies it): set "
                "trainer.learn_weights=false, or learn weights with sampling=uniform|weights",
            )
