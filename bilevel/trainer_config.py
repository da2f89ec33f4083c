"""``TrainerConfig``: the loop settings of :class:`~bilevel.BilevelTrainer` (the ``trainer``
config group without its optimizers), checked before any training."""

from __future__ import annotations

from dataclasses import dataclass

from bilevel.data.samplers import SAMPLING
from bilevel.errors import ConfigError

__all__ = ["TrainerConfig"]


@dataclass
class TrainerConfig:
    """Loop settings (the ``trainer`` config group, minus the optimizers).

    Attributes:
        steps: total inner optimizer steps.
        outer_every: inner steps per outer (weight) update.
        batch_size: training examples per inner step (all ranks together).
        meta_batch_size: meta examples per hypergradient; ``None`` uses the whole meta set.
        sampling: how a batch splits over domains: ``uniform`` | ``size`` | ``weights``.
        log_every: inner steps between log events (the only regular host reads).
        checkpoint_every: inner steps between checkpoints (0: only at the end).
        eval_every: inner steps between test-set evaluations (0: only at the end).
        max_skipped: consecutive non-finite updates after which the run stops.
        precision: ``fp32`` or ``bf16`` (autocast of the forward passes; hypergradient math and
            weights stay float32).
        inner_lr: the step size the hypergradient assumes (``first_order``, ``unrolled``);
            ``None`` reads the inner optimizer's current learning rate.
        learn_weights: ``False`` keeps the weights at their initial values (the fixed-weight
            baseline: the same loop without hypergradients).
        progress: show a progress bar.
    """

    steps: int = 1000
    outer_every: int = 5
    batch_size: int = 128
    meta_batch_size: int | None = None
    sampling: str = "uniform"
    log_every: int = 50
    checkpoint_every: int = 0
    eval_every: int = 0
    max_skipped: int = 20
    precision: str = "fp32"
    inner_lr: float | None = None
    learn_weights: bool = True
    progress: bool = True

    def validate(self) -> None:
        positive = ["steps", "outer_every", "batch_size", "log_every", "max_skipped"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"trainer.{name}", f"must be an integer >= 1, got {value!r}")
        for name in ["checkpoint_every", "eval_every"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"trainer.{name}", f"must be an integer >= 0, got {value!r}")
        if self.meta_batch_size is not None and self.meta_batch_size < 1:
            raise ConfigError("trainer.meta_batch_size", "must be >= 1 or null (whole meta set)")
        if self.sampling not in SAMPLING:
            raise ConfigError("trainer.sampling", f"must be one of {', '.join(SAMPLING)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("trainer.precision", f"must be fp32 or bf16, got {self.precision!r}")
        if self.inner_lr is not None and not self.inner_lr > 0:
            raise ConfigError("trainer.inner_lr", f"must be > 0 or null, got {self.inner_lr!r}")
