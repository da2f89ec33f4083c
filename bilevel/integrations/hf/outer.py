"""The outer update inside a Hugging Face trainer: the hypergradient of the meta loss, every
``outer_every`` optimizer steps.

The products come, cheapest first, from

1. **the last inner step's graph** (autograd products, ``sampling="loss"``): the last
   micro-batch of a window computes its gradient with ``create_graph`` at copies of the
   parameters, before the optimizer steps, and adds it to the parameters' gradients itself
   (averaged over ranks under DDP, as DDP would). The solver takes J_L v (and H u) from that
   graph at theta_{T-1} and the meta gradient at theta_T: for ``first_order`` the exact
   derivative of the meta loss through that step, as in :class:`~bilevel.BilevelTrainer`, with
   no extra forward pass;
2. **the public** :func:`bilevel.hypergradient` at theta_T on the window's last batch:
   finite-difference products (under FSDP or DeepSpeed, or with fused attention kernels, said
   in the log), ``sampling="weights"``, or an fp16 loss scaler.

Under DDP every product and the meta gradient are averaged over the ranks, so the weights stay
identical on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from bilevel.errors import ConfigError
from bilevel.functional import make_outer_loss, make_per_domain_loss, trainable_params
from bilevel.hypergradient import hypergradient
from bilevel.integrations.hf.losses import as_batch, as_meta_batch, meta_loss_fn, to_device
from bilevel.methods.apply import apply_update
from bilevel.methods.base import OuterUpdate
from bilevel.optim import l2_decay, preconditionable
from bilevel.outer import MirrorDescent
from bilevel.solvers import build
from bilevel.solvers.backends import WithL2
from bilevel.solvers.products import InnerProducts, grad_of_outer_value
from bilevel.solvers.unrolled import Unrolled
from bilevel.strategies.distributed import DistContext

__all__ = ["OuterState", "OuterStepCallback"]

log = logging.getLogger("bilevel")

FUSED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _attention(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def prepared(trainer: Any, dataset: Any) -> Any:
    """The meta set prepared as the trainer prepares its evaluation sets: tokenized by TRL's
    ``SFTTrainer`` (when it prepares datasets), its unused columns removed."""
    prepare = getattr(trainer, "_prepare_dataset", None)
    if callable(prepare) and not getattr(trainer, "_skip_prepare_dataset", True):
        args = trainer.args
        packing = getattr(args, "eval_packing", None)
        packing = getattr(args, "packing", False) if packing is None else packing
        formatting = getattr(trainer, "_formatting_func", None)
        dataset = prepare(dataset, trainer.processing_class, args, packing, formatting, "meta")
    if getattr(trainer.args, "remove_unused_columns", False) and hasattr(dataset, "map"):
        try:
            dataset = trainer._remove_unused_columns(dataset, description="meta")
        except ValueError:
            raise ValueError(
                f"meta_dataset: none of its columns ({', '.join(dataset.column_names)}) is an "
                "input of the model: give it the train set's format"
            ) from None
    return dataset


class MetaBatches:
    """Meta batches from the meta dataset, shuffled by a seeded stream, endlessly; its
    position is part of the checkpoint."""

    def __init__(self, trainer: Any, dataset: Any, batch_size: int) -> None:
        from torch.utils.data import DataLoader

        collator = trainer.data_collator.collator  # the user's collator, without the domain
        dataset = prepared(trainer, dataset)
        self.generator = torch.Generator().manual_seed(int(trainer.args.seed) + 104729)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collator,
            generator=self.generator,
        )
        self.epoch, self.position = 0, 0
        self._start = self.generator.get_state()
        self._iterator = None

    def next(self) -> dict[str, Any]:
        while True:
            if self._iterator is None:
                self._start = self.generator.get_state()
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                self.position += 1
                return dict(batch)
            except StopIteration:
                self._iterator = None
                self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["start"])
        self._iterator = None
        position = int(state["position"])
        self.epoch, self.position = int(state["epoch"]), 0
        self._start = self.generator.get_state()
        self._iterator = iter(self.loader)
        for _ in range(position):  # the meta batches of this epoch already used
            next(self._iterator)
            self.position += 1


class OuterState:
    """What the mixin adds to a trainer: the solver, the outer optimizer, the meta batches and
    the kept graph of a window's last step (see the module doc)."""

    def __init__(
        self,
        trainer: Any,
        solver: Any,
        outer_optimizer: Any,
        meta_dataset: Any,
        meta_loss: Any,
        meta_batch_size: int,
    ) -> None:
        self.trainer = trainer
        self.weights = trainer.domain_weights
        self.k = len(self.weights.names)
        args = trainer.args
        self.dist = DistContext(args.process_index, args.world_size, args.local_process_index)
        self.solver, self.path = self._solver(solver)
        self.outer_opt = self._outer_optimizer(outer_optimizer)
        self.meta = MetaBatches(trainer, meta_dataset, meta_batch_size)
        self.meta_fn = meta_loss_fn(meta_loss, trainer._shift)
        self._check_meta_format(meta_dataset)
        for p in self.weights.parameters():  # every rank starts from rank 0's weights
            self.dist.broadcast_(p.data)
        self.w = self.weights.value().detach()
        self.products: InnerProducts | None = None
        self.last_batch: dict[str, Any] | None = None
        self.meta_value: Tensor | None = None
        self.sampler: Any = None
        self.step_lr: float | None = None
        self.last_grads: list[Tensor] | None = None

    # -- setup ------------------------------------------------------------------------------------

    def _solver(self, solver: Any) -> tuple[Any, str]:
        built = build(solver) if isinstance(solver, str) else solver
        name = getattr(built, "name", type(built).__name__)
        if isinstance(built, Unrolled) or callable(getattr(built, "window", None)):
            raise ConfigError(
                "solver",
                f"{name} runs its own window of inner steps, which the Trainer takes: inside a "
                "Trainer use first_order, neumann, cg or sama",
            )
        if not callable(getattr(built, "domain_grad", None)):
            raise ConfigError("solver", f"{built!r} is not a solver (bilevel.solvers.build)")
        model = self.trainer.model
        accelerator = self.trainer.accelerator
        sharded = getattr(accelerator, "is_fsdp2", False) or str(
            getattr(accelerator, "distributed_type", "")
        ).endswith(("FSDP", "DEEPSPEED"))
        fused = _attention(model) in FUSED
        products = getattr(built, "products", None)
        if products == "autograd" and (sharded or fused):
            built = dataclasses.replace(built, products="finite_difference")
            why = "the model is sharded" if sharded else f"attention is {_attention(model)}"
            log.warning(
                f"note: {why}, which has no double backward: the hypergradient ({name}) uses "
                "finite-difference products (forward and backward passes only)"
            )
        fp16 = getattr(accelerator, "scaler", None) is not None
        graph = (
            getattr(built, "products", "autograd") == "autograd"
            and callable(getattr(built, "solve", None))
            and self.trainer.sampling == "loss"
            and not fp16
            and not sharded
        )
        return built, "graph" if graph else "api"

    def _outer_optimizer(self, outer: Any) -> torch.optim.Optimizer:
        params = list(self.weights.parameters())
        if isinstance(outer, int | float) and not isinstance(outer, bool):
            if not outer > 0:
                raise ValueError(f"outer_optimizer: a learning rate must be > 0, got {outer!r}")
            return torch.optim.Adam(params, lr=float(outer))
        if callable(outer):
            optimizer = outer(params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"outer_optimizer must build a torch optimizer, got {type(optimizer).__name__}"
                )
            if isinstance(optimizer, MirrorDescent) and self.weights.parametrization not in (
                "softmax",
                "exp",
            ):
                raise ValueError("mirror descent needs softmax or exp weights")
            return optimizer
        raise TypeError(
            "outer_optimizer must be a learning rate or a function of the logits that builds an "
            f"optimizer, got {outer!r}"
        )

    def _check_meta_format(self, meta_dataset: Any) -> None:
        """A meta batch must hold the train batches' kind of inputs (the same collator, the
        same columns): another format failed only at the first outer step."""
        trainer = self.trainer
        train = trainer.train_dataset
        meta_dataset = self.meta.loader.dataset  # as the trainer prepared it
        if not (hasattr(train, "__getitem__") and hasattr(meta_dataset, "__getitem__")):
            return
        try:
            meta_keys = set(self.meta.loader.collate_fn([meta_dataset[0]]))
        except Exception as err:  # noqa: BLE001 - said in one line
            raise ValueError(
                f"meta_dataset: the trainer's collator cannot batch its examples "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0][:160]}): give it the "
                "train set's format"
            ) from None
        first = train[0]
        train_keys = {k for k in first if k != "domain"} if hasattr(first, "keys") else set()
        needed = {k for k in train_keys if k in ("input_ids", "labels", "label", "pixel_values")}
        missing = needed - meta_keys
        if missing:
            raise ValueError(
                f"meta_dataset: its batches lack {sorted(missing)}, which the train batches hold: "
                "give it the train set's format"
            )

    # -- the window's last step -------------------------------------------------------------------

    def window_ends(self) -> bool:
        return (self.trainer.state.global_step + 1) % self.trainer.outer_every == 0

    def keeps_graph_now(self) -> bool:
        return self.path == "graph" and self.window_ends()

    def _model(self) -> Any:
        model = self.trainer.model
        unwrap = getattr(self.trainer.accelerator, "unwrap_model", None)
        if callable(unwrap):
            try:
                return unwrap(model, keep_torch_compile=False)
            except TypeError:
                return unwrap(model)
        return model

    def step_keeping_graph(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        """The last micro-batch of a window: its gradient of sum_k w_k L_k with
        ``create_graph`` at copies of the parameters, added to their gradients."""
        trainer = self.trainer
        model.train()
        module = self._model()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        theta = [p.detach().clone().requires_grad_(True) for _, p in named]
        batch = as_batch(inputs, trainer._domain)
        self.last_batch = batch
        per_domain = make_per_domain_loss(module, batch, trainer._example_loss, self.k)
        with trainer.compute_loss_context_manager():
            losses = per_domain(dict(zip([n for n, _ in named], theta, strict=True))).float()
        w = self.w.to(losses.dtype).clone().requires_grad_(True)
        objective = torch.dot(w, losses)
        grads = torch.autograd.grad(
            objective, theta, create_graph=True, allow_unused=True, materialize_grads=True
        )
        scale = 1.0 / max(1, getattr(trainer, "current_gradient_accumulation_steps", 1))
        for (_, p), g in zip(named, grads, strict=True):
            step = g.detach() * scale
            p.grad = step if p.grad is None else p.grad + step
        if self.dist.enabled:  # what DDP's backward would have done on this last micro-batch
            for p, mean in zip(
                [p for _, p in named],
                self.dist.reduce([p.grad for _, p in named]),
                strict=True,
            ):
                p.grad = mean
        reduce = self.dist.reduce if self.dist.enabled else None
        self.products = InnerProducts(grads, theta, w, losses, reduce)
        trainer.record_domain_losses(losses)
        return objective.detach() * scale

    # -- the outer update -------------------------------------------------------------------------

    def update(self) -> None:
        """One hypergradient step of the weights (at the end of a window)."""
        trainer = self.trainer
        module = self._model()
        device = trainer.args.device
        meta = as_meta_batch(to_device(self.meta.next(), device))
        outer = make_outer_loss(module, meta, self.meta_fn)
        lr = trainer.inner_lr if trainer.inner_lr is not None else self.step_lr
        params = trainable_params(module)
        with torch.enable_grad():
            if self.path == "graph" and self.products is not None:
                grad = self._solve(module, outer, params, lr)
            else:
                grad = self._public(module, outer, params, lr)
        found, _ = apply_update(self.weights, self.outer_opt, OuterUpdate(grad=grad))
        self.w = self.weights.value().detach()
        if self.sampler is not None:
            self.sampler.set_shares(self.w)
        self.products = None
        self.last_batch = None
        del found

    def _solve(self, module: Any, outer: Any, params: dict[str, Tensor], lr: float) -> Tensor:
        trainer = self.trainer
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with trainer.compute_loss_context_manager():
            value = outer(theta).float()
        self.meta_value = value.detach()
        g_outer = grad_of_outer_value(value, list(theta.values()))
        if self.dist.enabled:
            g_outer = self.dist.reduce(g_outer)
        products = self.products
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        l2 = l2_decay(optimizer, [p for p in module.parameters() if p.requires_grad])
        if l2 is not None and getattr(self.solver, "uses_hessian", False):
            products = WithL2(products, l2)
        kwargs: dict[str, Any] = {}
        if getattr(self.solver, "uses_optimizer", False) and preconditionable(optimizer):
            kwargs = dict(
                optimizer=optimizer,
                params=[p for p in module.parameters() if p.requires_grad],
                last_grads=self.last_grads,
                local=lambda t: t,
            )
        return self.solver.solve(products, g_outer, lr, **kwargs)

    def _public(self, module: Any, outer: Any, params: dict[str, Tensor], lr: float) -> Tensor:
        batch = self.last_batch
        if batch is None:
            raise RuntimeError("no training batch of this window was kept for the hypergradient")
        batch = to_device(batch, self.trainer.args.device)
        per_domain = make_per_domain_loss(module, batch, self.trainer._example_loss, self.k)
        with self.trainer.compute_loss_context_manager():
            self.meta_value = outer(params).detach()
            grad = hypergradient(
                self.solver,
                per_domain,
                outer,
                params,
                self.weights,
                lr,
                wrt="values",
                reduce=self.dist.reduce if self.dist.enabled else None,
            )
        return grad

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        solver_state = getattr(self.solver, "state_dict", None)
        return {
            "names": list(self.weights.names),
            "weights": self.weights.state_dict(),
            "outer_optimizer": self.outer_opt.state_dict(),
            "solver": solver_state() if callable(solver_state) else {},
            "meta": self.meta.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != list(self.weights.names):
            raise ConfigError(
                "resume_from_checkpoint",
                f"the checkpoint's domains {list(state['names'])} differ from "
                f"{list(self.weights.names)}",
            )
        self.weights.load_state_dict(state["weights"])
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        load = getattr(self.solver, "load_state_dict", None)
        if callable(load) and state.get("solver"):
            load(state["solver"])
        self.meta.load_state_dict(state["meta"])
        self.w = self.weights.value().detach()
        if self.sampler is not None:
            self.sampler.set_shares(self.w)


class OuterStepCallback(TrainerCallback):
    """Takes the outer step after every ``outer_every``-th optimizer step (before the trainer
    logs and saves), and keeps what it needs of the step before it."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        outer = self.trainer.bilevel
        if not outer.window_ends():
            return
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        lr = optimizer.param_groups[0]["lr"]
        outer.step_lr = float(lr) if isinstance(lr, Tensor) else lr
        if getattr(outer.solver, "uses_optimizer", False):
            params = [p for p in outer._model().parameters() if p.requires_grad]
            outer.last_grads = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in params
            ]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.trainer.outer_every == 0:
            self.trainer.bilevel.update()
