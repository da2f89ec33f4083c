"""``DomainWeightsMixin``: domain weights learned inside Hugging Face ``Trainer``.

``class MyTrainer(DomainWeightsMixin, Trainer)`` (or ``(DomainWeightsMixin, SFTTrainer)``)
keeps the trainer's loop, logging, checkpoints and launchers, and changes three things:

* the loss of each batch is sum_k w_k L_k, L_k the mean loss of domain k's examples in the
  batch (``sampling="loss"``), or the plain mean over a batch drawn by the weights
  (``sampling="weights"``, through :class:`~bilevel.integrations.hf.WeightedDomainSampler`);
* every ``outer_every`` optimizer steps, a hypergradient of the meta loss moves the weights
  (:mod:`bilevel.integrations.hf.outer`);
* the weights, the outer optimizer and the solver's state go into every checkpoint, and the
  weights into every log (``weights/<domain>``).

The train dataset carries a ``domain`` column (an int, or a domain's name); the mixin keeps it
through the trainer's column filtering and its collator.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.functional import segment_mean
from bilevel.integrations.hf import outer as outer_step
from bilevel.integrations.hf.data import DomainCollator, domain_indices, keep_domains
from bilevel.integrations.hf.losses import as_batch, example_loss_fn, is_causal_lm
from bilevel.integrations.hf.sampling import WeightedDomainSampler
from bilevel.weights import DomainWeights

__all__ = ["DomainWeightsMixin"]

log = logging.getLogger("bilevel")
STATE_FILE = "bilevel_state.pt"


def _is_hf_trainer(cls: type) -> bool:
    transformers = sys.modules.get("transformers")
    trainer = getattr(transformers, "Trainer", None) if transformers is not None else None
    return trainer is not None and isinstance(cls, type) and issubclass(cls, trainer)


class DomainWeightsMixin:
    """Learn domain weights inside a Hugging Face ``Trainer`` (see the module doc).

    Args:
        domain_weights: the :class:`~bilevel.DomainWeights` to learn (their names are the
            domains; the train dataset's ``domain`` column holds indices or names).
        meta_dataset: the meta set, any dataset the trainer's collator can batch.
        solver: a solver's name or a built solver (:func:`bilevel.solvers.build`):
            ``first_order`` (default), ``neumann``, ``cg`` or ``sama``.
        outer_every: optimizer steps per outer update.
        outer_optimizer: a learning rate (Adam on the logits) or a function of the logits'
            parameter list that builds an optimizer (``bilevel.MirrorDescent`` too).
        meta_loss: ``(outputs, inputs) -> scalar``; default the model's own loss on the meta
            batch (from its labels).
        sampling: ``"loss"`` (weight each domain's mean loss) or ``"weights"`` (draw batches by
            the weights and take the plain mean).
        inner_lr: the step size the hypergradient assumes for an inner step; default the
            learning rate of the optimizer's last step.
        meta_batch_size: meta examples per hypergradient (default: the train batch size).
        per_example_loss: ``(outputs, inputs) -> Tensor[B]``, one loss per example, for a
            model whose loss the mixin cannot read (default: causal LM, sequence and token
            classification from the logits and labels).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        before = mro[1 : mro.index(DomainWeightsMixin)]
        wrong = [c for c in before if _is_hf_trainer(c) and not issubclass(c, DomainWeightsMixin)]
        if wrong:
            raise TypeError(
                f"{cls.__name__}: DomainWeightsMixin must come before the trainer class in the "
                f"bases, class {cls.__name__}(DomainWeightsMixin, {wrong[0].__name__}): after "
                "it, the trainer's own methods would run instead of the mixin's"
            )

    def __init__(
        self,
        *args: Any,
        domain_weights: DomainWeights,
        meta_dataset: Any,
        solver: Any = "first_order",
        outer_every: int = 5,
        outer_optimizer: float | Callable[[list[Tensor]], torch.optim.Optimizer] = 0.05,
        meta_loss: Callable[[Any, Any], Tensor] | None = None,
        sampling: str = "loss",
        inner_lr: float | None = None,
        meta_batch_size: int | None = None,
        per_example_loss: Callable[[Any, Any], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(domain_weights, DomainWeights):
            raise TypeError(
                "domain_weights must be a bilevel.DomainWeights, got "
                f"{type(domain_weights).__name__}"
            )
        if sampling not in ("loss", "weights"):
            raise ValueError(f"sampling must be 'loss' or 'weights', got {sampling!r}")
        if not (isinstance(outer_every, int) and outer_every >= 1):
            raise ValueError(f"outer_every must be an integer >= 1, got {outer_every!r}")
        if meta_dataset is None:
            raise ValueError("meta_dataset is needed: the data the outer loss measures")
        super().__init__(*args, **kwargs)
        self.domain_weights = domain_weights.to(self.args.device)
        self.domain_names = list(domain_weights.names)
        self.sampling = sampling
        self.outer_every = outer_every
        self.inner_lr = inner_lr
        model = self.model
        self._shift = is_causal_lm(model)
        self._example_loss = example_loss_fn(per_example_loss, self._shift)
        self.train_dataset = keep_domains(self.train_dataset, self.domain_names)
        self.data_collator = DomainCollator(self.data_collator, self.domain_names)
        # the mixin computes the loss itself, as a mean per micro-batch: the trainer divides
        # it by the gradient accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.bilevel = outer_step.OuterState(
            self,
            solver,
            outer_optimizer,
            meta_dataset,
            meta_loss,
            meta_batch_size or self.args.per_device_train_batch_size,
        )
        self._domain: Tensor | None = None
        self._loss_sums = torch.zeros(len(self.domain_names), device=self.args.device)
        self._loss_counts = 0
        self.add_callback(outer_step.OuterStepCallback(self))

    # -- the trainer's data ----------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "domain" not in self._signature_columns:  # the trainer would drop the column
            self._signature_columns = [*self._signature_columns, "domain"]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.sampling != "weights":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        sampler = WeightedDomainSampler(
            domain_indices(dataset, self.domain_names),
            len(self.domain_names),
            self.args.per_device_train_batch_size,
            self.args.seed,
        )
        sampler.set_shares(self.domain_weights.value())
        self.bilevel.sampler = sampler
        return sampler

    # -- one step ---------------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        inputs = dict(inputs)
        domain = inputs.pop("domain", None)
        if domain is None:
            raise ValueError(
                "the batch has no 'domain' column: the train dataset needs one (an int index or "
                "a domain name per example), and the collator must not be replaced after the "
                "trainer is built"
            )
        self._domain = domain.to(self.args.device)
        if self.bilevel.path == "api" and self.bilevel.window_ends():
            self.bilevel.last_batch = as_batch(inputs, self._domain)  # for the hypergradient
        if self.bilevel.keeps_graph_now():
            loss = self.bilevel.step_keeping_graph(model, self._prepare_inputs(inputs))
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        return loss

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        inputs = dict(inputs)
        domain = inputs.pop("domain", None)
        if domain is None and model.training:
            domain = self._domain
        batch = as_batch(inputs)
        outputs = model(**batch["x"])
        per_example = self._example_loss(outputs, batch)
        if not isinstance(per_example, Tensor) or per_example.dim() != 1:
            raise ValueError(
                "per_example_loss must return one loss per example, Tensor[B], got "
                f"{tuple(per_example.shape) if isinstance(per_example, Tensor) else per_example!r}"
            )
        if domain is None or not model.training:  # evaluation: the plain mean
            loss = per_example.mean()
        else:
            losses = segment_mean(
                per_example, domain.to(per_example.device), len(self.domain_names)
            )
            self.record_domain_losses(losses)
            if self.sampling == "weights":
                loss = per_example.mean()
            else:
                loss = torch.dot(self.bilevel.w.to(losses.dtype), losses)
        return (loss, outputs) if return_outputs else loss

    def record_domain_losses(self, losses: Tensor) -> None:
        self._loss_sums += losses.detach().float()
        self._loss_counts += 1

    # -- logs and checkpoints -------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.model.training:
            weights = self.domain_weights.value().detach().cpu().tolist()
            for name, value in zip(self.domain_names, weights, strict=True):
                logs[f"weights/{name}"] = value
            if self._loss_counts:
                means = (self._loss_sums / self._loss_counts).cpu().tolist()
                for name, value in zip(self.domain_names, means, strict=True):
                    logs[f"domain_loss/{name}"] = value
                self._loss_sums.zero_()
                self._loss_counts = 0
            if self.bilevel.meta_value is not None:
                logs["meta_loss"] = float(self.bilevel.meta_value)
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"
            )
            torch.save(self.bilevel.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise ConfigError(
                "resume_from_checkpoint",
                f"{resume_from_checkpoint} holds no {STATE_FILE}: it was not written by a "
                "trainer with DomainWeightsMixin, so the domain weights cannot continue",
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.bilevel.load_state_dict(state)
