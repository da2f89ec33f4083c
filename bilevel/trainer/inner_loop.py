"""The inner problem's moving parts, shared by every outer method.

:class:`InnerLoop` holds the model (as the strategy laid it out), its trainable parameters, the
inner optimizer and scheduler, the samplers, the current weight values and the on-device skip
counters, and offers what a method needs from a window:

* :meth:`InnerLoop.next_batch` / :meth:`InnerLoop.meta_batch`: batches, on the device;
* :meth:`InnerLoop.inner_step`: one optimizer step on the weighted mixture, optionally keeping
  the gradient's graph (autograd products at theta_{T-1} for free);
* :meth:`InnerLoop.meta_gradient`: grad M at the current parameters;
* :meth:`InnerLoop.module_products`: finite-difference products at the current parameters
  (the module's own, or their shards);
* :meth:`InnerLoop.per_domain_loss` / :meth:`InnerLoop.outer_loss_fn`: the functional forms the
  public :func:`bilevel.hypergradient` takes.

Nothing here reads a value back to the host: non-finite steps are found and skipped on the
device, and the learning rate is a Python number the optimizer already holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
from bilevel.data.columns import to_device
from bilevel.data.domain_data import DomainData
from bilevel.data.samplers import APPLIES_WEIGHTS, MetaSampler
from bilevel.errors import ConfigError
from bilevel.functional import (
    forward_batch,
    make_outer_loss,
    make_per_domain_loss,
    make_per_example_loss,
    segment_mean,
)
from bilevel.optim import found_inf, guarded_step, is_plain_sgd, plain_sgd_step
from bilevel.solvers.finite_difference import FiniteDifferenceProducts, ModulePoint, default_step
from bilevel.solvers.products import InnerProducts, grad_of_outer_value, poison_nonfinite
from bilevel.strategies.base import Strategy
from bilevel.trainer.config import TrainerConfig
from bilevel.trainer.optimizers import (
    OptimizerFactory,
    check_holds_exactly,
    default_sgd,
    make_optimizer,
    make_scheduler,
)
from bilevel.trainer.skips import SkipCounter
from bilevel.weights import DomainWeights

__all__ = ["InnerLoop"]

Loss = Callable[[Any, Any], Tensor]


class InnerLoop:
    """See the module doc. Built by :class:`~bilevel.BilevelTrainer`."""

    def __init__(
        self,
        module: nn.Module,
        weights: DomainWeights,
        inner_loss: Loss,
        outer_loss: Loss,
        data: DomainData,
        config: TrainerConfig,
        strategy: Strategy,
        device: torch.device,
        seed: int = 0,
        inner_optimizer: OptimizerFactory | None = None,
        inner_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        self.config, self.strategy, self.device = config, strategy, device
        self.module = module
        self.weights = weights
        self.names = list(weights.names)
        self.k = len(self.names)
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("model", "the model has no trainable parameters")
        self.net = strategy.wrap(module)
        # FSDP replaces the parameters by sharded ones: read them after wrapping.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        fused = device.type in ("cpu", "cuda")
        self.inner_opt = make_optimizer(
            inner_optimizer or default_sgd(fused), self.params, "trainer.inner_optimizer"
        )
        self.plain_sgd = (
            is_plain_sgd(self.inner_opt) and len(self.inner_opt.param_groups) == 1 and fused
        )
        check_holds_exactly(
            self.inner_opt,
            named,
            "trainer.inner_optimizer",
            "trainable tensors of the model",
            "; to keep a tensor of the model out of training, freeze it (requires_grad_(False))",
        )
        group_of = {
            id(p): i for i, g in enumerate(self.inner_opt.param_groups) for p in g["params"]
        }
        self._group_of_param = [group_of[id(p)] for p in self.params]
        if strategy.sharded and isinstance(self.inner_opt, torch.optim.SGD):
            # torch's fused SGD kernel has no rule for sharded tensors; plain SGD steps still
            # run fused on the local shards (below), other SGD steps use the foreach kernel
            for group in self.inner_opt.param_groups:
                group["fused"] = False
        self.scheduler = make_scheduler(inner_scheduler, self.inner_opt, config.steps)
        self.train_sampler = data.train_sampler(
            self.k,
            config.batch_size,
            config.sampling,
            seed,
            strategy.rank,
            strategy.world_size,
            config.temperature,
            device,
        )
        self.meta_sampler = MetaSampler(
            to_device(data.meta, device),
            config.meta_batch_size,
            seed,
            strategy.rank,
            strategy.world_size,
        )
        self.skips = SkipCounter(device)
        self._one = torch.ones((), device=device, dtype=torch.float32)
        self.keep_last_grads = False
        self.last_grads: list[Tensor] | None = None
        self.last: dict[str, Tensor] = {}
        self.last_batch: dict[str, Any] | None = None
        self.last_per_example: Tensor | None = None
        self.last_lr = self.current_lr()
        self.last_step_sizes = self.current_step_sizes()
        self._steps_left, self._after_last_step = 0, None
        self.refresh_weights()

    # -- small helpers -----------------------------------------------------------------------------

    def refresh_weights(self) -> None:
        """Re-read the weight values after the outer variables changed."""
        self.w = self.weights.value().detach()

    def current_lr(self) -> float:
        lr = self.inner_opt.param_groups[0]["lr"]
        return float(lr) if not isinstance(lr, Tensor) else lr

    def current_step_sizes(self) -> list[Any] | None:
        """Each trainable tensor's learning rate (in the order of ``params``) where the inner
        optimizer's parameter groups have learning rates of their own; ``None`` where one
        applies to all (:meth:`current_lr`)."""
        groups = self.inner_opt.param_groups
        if len(groups) == 1:
            return None
        lrs = [g["lr"] for g in groups]
        if not any(isinstance(lr, Tensor) for lr in lrs) and len(set(lrs)) == 1:
            return None
        return [lrs[i] for i in self._group_of_param]

    def hyper_lr(self) -> float | list[Any]:
        """The step size the hypergradient assumes: ``trainer.inner_lr`` when set, else the
        learning rate of the last inner step actually taken (one per trainable tensor where
        the optimizer's parameter groups have their own)."""
        if self.config.inner_lr is not None:
            return float(self.config.inner_lr)
        return self.last_step_sizes if self.last_step_sizes is not None else self.last_lr

    @property
    def applies_weights(self) -> bool:
        """Whether the sampler applies the mixture (``weights``, ``temperature``), so the
        objective is the plain batch mean instead of sum_k w_k L_k."""
        return self.config.sampling in APPLIES_WEIGHTS

    def autocast(self):
        if self.config.precision == "bf16" and self.strategy.name != "fsdp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_dtype(self) -> torch.dtype:
        if self.config.precision == "bf16":
            return torch.bfloat16
        return self.params[0].dtype

    def default_fd_step(self) -> float:
        return default_step(self.compute_dtype())

    def with_autocast(self, fn: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
        if self.config.precision != "bf16":
            return fn

        def wrapped(params):
            with self.autocast():
                return fn(params).float()

        return wrapped

    def found_inf(self, tensors: list[Tensor]) -> Tensor:
        """1.0 if any element of ``tensors`` is NaN/inf on any rank, else 0.0 (no host sync)."""
        found = found_inf(tensors, self._one)
        if self.strategy.world_size > 1:  # every rank must take the same decision
            found = (self.strategy.reduce([found.reshape(1)])[0].reshape(()) > 0).float()
        return found

    def weighted(self, losses: Tensor, w: Tensor | None = None) -> Tensor:
        """sum_k w_k L_k, in the dtype of the losses promoted with the weights'."""
        w = self.w if w is None else w
        dtype = torch.promote_types(w.dtype, losses.dtype)
        return torch.dot(w.to(dtype), losses.to(dtype))

    # -- batches -----------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, Any]:
        return self.train_sampler.next(self.w)

    def uniform_batch(self) -> dict[str, Any]:
        return self.train_sampler.next_uniform()

    def inverse_counts(self, batch: dict[str, Any]) -> Tensor | None:
        """The per-domain normalizer the batch was drawn with (see :class:`Batch`)."""
        return getattr(batch, "inverse_counts", None)

    def meta_batch(self) -> dict[str, Any]:
        return self.meta_sampler.next()

    # -- the losses as functions of the parameters (for the public API) ----------------------------

    def per_domain_loss(self, batch: dict[str, Any]):
        return self.with_autocast(
            make_per_domain_loss(
                self.module, batch, self.inner_loss, self.k, self.inverse_counts(batch)
            )
        )

    def outer_loss_fn(self, meta: dict[str, Any]):
        return self.with_autocast(make_outer_loss(self.module, meta, self.outer_loss))

    def per_example(self, batch: dict[str, Any], model: nn.Module | None = None) -> Tensor:
        with self.autocast():
            out = self.inner_loss(forward_batch(self.net if model is None else model, batch), batch)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def domain_losses(self, per_example: Tensor, batch: dict[str, Any]) -> Tensor:
        return segment_mean(per_example, batch["domain"], self.k, self.inverse_counts(batch))

    def objective(self, per_example: Tensor, losses: Tensor) -> Tensor:
        if self.applies_weights:  # the sampler already applied the weights
            return per_example.mean()
        return self.weighted(losses)

    # -- one inner step ----------------------------------------------------------------------------

    def inner_step(
        self,
        batch: dict[str, Any],
        keep_graph: bool = False,
        *,
        example_weights: Callable[[Tensor, dict[str, Any]], Tensor] | None = None,
        extra: Callable[[], Tensor] | None = None,
        mean: bool = False,
        coefficients: Callable[[Tensor, dict[str, Any]], Tensor] | None = None,
    ) -> InnerProducts | None:
        """One optimizer step on the weighted mixture.

        Methods adjust the objective with ``example_weights`` (``(per_example, batch) -> [B]``
        factors, detached, that multiply each example's loss), ``extra`` (a scalar added to the
        objective, e.g. ScaleBiO's meta term) or ``mean`` (the plain batch mean: the batch was
        drawn from the mixture itself). With ``keep_graph`` and ``coefficients`` (per-example
        weights c ``[B]``, a meta-weight net's) the objective is (1/B) sum_i c_i l_i and the kept
        graph's leaf is c: the products then act on examples instead of domains.

        With ``keep_graph`` the step's gradient is taken with ``create_graph=True``, at copies of
        the parameters and with the weights as a leaf, and returned as :class:`InnerProducts`:
        the hypergradient then gets J_L v (and H u) at theta_{T-1} from this graph instead of
        running a new forward and backward. The copies matter: optimizers update parameters in
        place, and fused kernels do so without bumping autograd's version counters, so a graph
        built on the parameters themselves would silently read theta_T.
        """
        self.last_batch = batch
        products = None
        if keep_graph:
            theta = [p.detach().clone().requires_grad_(True) for p in self.params]
            at = dict(zip(self.param_names, theta))
            if coefficients is None:
                losses = self.per_domain_loss(batch)(at)
                units = losses
                dtype = torch.promote_types(self.w.dtype, losses.dtype)
                w = self.w.to(dtype).clone().requires_grad_(True)
                objective = torch.dot(w, losses.to(dtype))
            else:
                units = self.with_autocast(
                    make_per_example_loss(self.module, batch, self.inner_loss)
                )(at)
                c = coefficients(units.detach(), batch).detach()
                w = c.to(units.dtype).clone().requires_grad_(True)
                objective = torch.dot(w, units) / units.numel()
                losses = self.domain_losses(units.detach(), batch)
                per_example = units.detach()
            grads = torch.autograd.grad(
                objective, theta, create_graph=True, allow_unused=True, materialize_grads=True
            )
            reduce = self.strategy.reduce if self.strategy.world_size > 1 else None
            averaged = self.strategy.reduce([g.detach() for g in grads])
            for p, g in zip(self.params, averaged):
                p.grad = g
            products = InnerProducts(grads, theta, w, units, reduce)
        else:
            per_example = self.per_example(batch)
            losses = self.domain_losses(per_example, batch)
            if example_weights is not None:
                factors = example_weights(per_example.detach(), batch).detach()
                if mean:
                    objective = (per_example * factors).mean()
                else:
                    weighted_losses = self.domain_losses(per_example * factors, batch)
                    objective = self.objective(per_example * factors, weighted_losses)
            elif mean:
                objective = per_example.mean()
            else:
                objective = self.objective(per_example, losses)
            if extra is not None:
                objective = objective + extra()
            objective.backward()
        local_grads = [self.strategy.local(p.grad) for p in self.params if p.grad is not None]
        if self.keep_last_grads:
            self.last_grads = [
                self.strategy.local(p.grad).detach().clone()
                if p.grad is not None
                else torch.zeros_like(self.strategy.local(p))
                for p in self.params
            ]
        found = self.found_inf([*local_grads, objective.detach().reshape(-1)])
        self.last_lr = self.current_lr()
        self.last_step_sizes = self.current_step_sizes()
        if self.plain_sgd:
            live = [p for p in self.params if p.grad is not None]
            plain_sgd_step(
                [self.strategy.local(p) for p in live],
                [self.strategy.local(p.grad) for p in live],
                self.inner_opt.param_groups[0]["lr"],
                found,
            )
            for p in live:
                p.grad = None
            # The optimizer did step (through its functional kernel): tell the scheduler so.
            self.inner_opt._opt_called = True
        else:
            guarded_step(self.inner_opt, found)
        if self.scheduler is not None:
            self.scheduler.step()
        self.skips.add(found, inner=True)
        self.stepped()
        self.last["inner_loss"] = objective.detach()
        self.last["domain_loss"] = losses.detach()
        self.last_per_example = (
            per_example.detach() if not keep_graph or coefficients is not None else None
        )
        return products

    # -- buffers belong to the inner steps ------------------------------------------------------

    @contextlib.contextmanager
    def window_buffers(self, n: int, update: bool):
        """Around a method's window of ``n`` inner steps: when it ends with an outer update, the
        buffers as they were after the last inner step are put back at the end, undoing what
        the outer computation's forward passes did to them (see :mod:`bilevel.module_state`)."""
        self._steps_left = n if update else 0
        self._after_last_step = None
        try:
            yield
        finally:
            module_state.restore_buffers(self.module, self._after_last_step)
            self._steps_left, self._after_last_step = 0, None

    def stepped(self) -> None:
        """Count one inner step of the window (methods that step the parameters themselves,
        like unrolled, call it too); after the last one, keep the buffers."""
        if self._steps_left > 0:
            self._steps_left -= 1
            if self._steps_left == 0:
                self._after_last_step = module_state.snapshot_buffers(self.module)

    # -- what the hypergradient needs --------------------------------------------------------------

    def meta_gradient(self, meta: dict[str, Any] | None = None) -> list[Tensor]:
        """grad M at the current parameters on a meta batch (averaged over ranks; local shards
        under FSDP), marked NaN if M is not finite."""
        meta = self.meta_batch() if meta is None else meta
        with self.autocast():
            value = self.outer_loss(forward_batch(self.module, meta), meta)
        value = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        self.last["meta_value"] = value.detach()
        if self.strategy.world_size == 1:
            return grad_of_outer_value(value, self.params)
        grads = self.strategy.grads(value, self.params)
        finite = self.strategy.reduce([torch.isfinite(value.detach()).float().reshape(1)])[0]
        i = min(range(len(grads)), key=lambda j: grads[j].numel())
        grads[i] = poison_nonfinite(grads[i], torch.log(finite))  # -inf unless all ranks finite
        return grads

    def module_products(
        self, batch: dict[str, Any], step: float | None = None, hessian_batch: dict | None = None
    ) -> FiniteDifferenceProducts:
        """Finite-difference products of F = sum_k w_k L_k on ``batch`` at the module's current
        parameters (perturbed in place and restored exactly; local shards under FSDP)."""

        def point(b: dict[str, Any]) -> ModulePoint:
            def losses_fn() -> Tensor:
                return self.domain_losses(self.per_example(b, self.module), b)

            def grad_fn():
                with torch.enable_grad():
                    losses = self.domain_losses(self.per_example(b, self.module), b)
                    grads = self.strategy.grads(self.weighted(losses), self.params)
                return grads, losses

            return ModulePoint(
                [self.strategy.local(p) for p in self.params],
                losses_fn,
                grad_fn,
                after=lambda: self.strategy.reshard(self.module),
            )

        return FiniteDifferenceProducts(
            point(batch),
            self.default_fd_step() if step is None else step,
            reduce=self.strategy.reduce if self.strategy.world_size > 1 else None,
            shard_sum=self.strategy.sum if self.strategy.sharded else None,
            hessian_point=point(hessian_batch) if hessian_batch is not None else None,
        )

    def step_lr_note(self) -> str | None:
        """A note for the run's first lines when trainer.inner_lr differs from the optimizer."""
        if self.config.inner_lr is None:
            return None
        return (
            f"the hypergradient assumes inner steps of size trainer.inner_lr="
            f"{self.config.inner_lr}; the inner optimizer trains with its own lr="
            f"{self.current_lr()}"
        )
