"""Views of a :class:`~bilevel.BilevelTrainer`'s parts kept for users and scripts: the losses
(settable: the inner loop follows), the samplers, the inner optimizer and schedule, the skip
counters and the wandb run id. A mixin, so that the trainer's module holds the loop itself."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TrainerViews"]

Loss = Any


class TrainerViews:
    """Read-through properties over ``self.loop`` and ``self.logger_ids``."""

    @property
    def wandb_id(self) -> str | None:
        """The wandb run this run logs to (``None`` without wandb)."""
        return self.logger_ids.get("wandb")

    @property
    def inner_loss(self) -> Loss:
        return self._inner_loss

    @inner_loss.setter
    def inner_loss(self, fn: Loss) -> None:
        self._inner_loss = fn
        if "loop" in self.__dict__:
            self.loop.inner_loss = fn

    @property
    def outer_loss(self) -> Loss:
        return self._outer_loss

    @outer_loss.setter
    def outer_loss(self, fn: Loss) -> None:
        self._outer_loss = fn
        if "loop" in self.__dict__:
            self.loop.outer_loss = fn

    @property
    def skips(self):
        return self.loop.skips

    @property
    def train_sampler(self):
        return self.loop.train_sampler

    @property
    def meta_sampler(self):
        return self.loop.meta_sampler

    @property
    def inner_opt(self) -> torch.optim.Optimizer:
        return self.loop.inner_opt

    @property
    def scheduler(self):
        return self.loop.scheduler

    @property
    def wandb(self) -> Any:
        """The wandb tracker among ``loggers`` (``None`` without one); setting it replaces it."""
        return next((x for x in self.loggers if getattr(x, "name", None) == "wandb"), None)

    @wandb.setter
    def wandb(self, logger: Any) -> None:
        kept = [x for x in self.loggers if getattr(x, "name", None) != "wandb"]
        self.loggers = kept + ([logger] if logger is not None and self.strategy.is_main else [])
