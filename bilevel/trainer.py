"""``BilevelTrainer``: the inner/outer loop that learns domain weights while training a model.

One *window* is ``outer_every`` inner optimizer steps on the weighted mixture
sum_k w_k L_k, followed by one hypergradient (the configured solver, on a meta batch) and one
outer step on the weight logits. With ``solver=unrolled`` the last ``steps`` inner steps of the
window are themselves differentiated (reverse mode through the real SGD updates), so nothing is
computed twice.

Everything in the loop stays on the model's device. The host reads values back only at log,
evaluation and checkpoint events: non-finite steps are detected on the device and skipped by the
optimizers themselves (``found_inf``, as AMP's grad scaler does), and counted in device tensors.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import checkpoint as ckpt
from bilevel.data.columns import to_device
from bilevel.data.domain_data import DomainData
from bilevel.data.samplers import DomainSampler, MetaSampler
from bilevel.distributed import DistContext
from bilevel.errors import ConfigError, NonFiniteError
from bilevel.functional import (
    forward_batch,
    make_outer_loss,
    make_per_domain_loss,
    segment_mean,
    trainable_params,
)
from bilevel.guard import SkipCounter, found_inf, guarded_step, is_plain_sgd, plain_sgd_step
from bilevel.hypergradient import chain_through_parametrization, hypergradient
from bilevel.logging import RunLog
from bilevel.outer import MirrorDescent
from bilevel.solvers.base import Solver
from bilevel.solvers.products import InnerProducts, grad_of_outer_value
from bilevel.solvers.unrolled import Unrolled, sgd_step
from bilevel.trainer_config import TrainerConfig
from bilevel.weights import DomainWeights

__all__ = ["BilevelTrainer", "NonFiniteError", "TrainerConfig"]

Loss = Callable[[Any, Any], Tensor]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


class BilevelTrainer:
    """Learns domain weights for ``model`` on ``data`` with ``solver``.

    Args:
        model: any ``nn.Module``; called as ``model(batch["x"])`` (or ``model(**batch["x"])``).
        weights: the :class:`DomainWeights`, one per ``data.names`` entry in the same order.
        solver: from :func:`bilevel.solvers.build`.
        inner_loss: ``(output, batch) -> [B]`` per-example loss.
        outer_loss: ``(output, batch) -> scalar`` meta loss.
        data: the :class:`~bilevel.data.DomainData`.
        config: loop settings.
        inner_optimizer: ``params -> Optimizer`` (default SGD, lr 0.1, fused).
        outer_optimizer: ``params -> Optimizer`` for the logits (default Adam, lr 0.05, fused), or
            :class:`~bilevel.outer.MirrorDescent` (exponentiated gradient, as in DoReMi).
        inner_scheduler: optional ``optimizer -> LRScheduler``, stepped every inner step.
        device: where everything runs (default: the model's device).
        run_dir: where ``metrics.jsonl``, ``summary.json``, ``weights.png`` and
            ``checkpoints/last.pt`` go (``None``: nothing is written).
        wandb: an optional :class:`~bilevel.logging.WandbLogger`.
        dist: the data-parallel context (default: one process).
        run_config: the resolved config to record with the run.

    Example:
        >>> trainer = BilevelTrainer(model, weights, build("first_order"),
        ...                          per_example_cross_entropy, cross_entropy, data)
        >>> summary = trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        weights: DomainWeights,
        solver: Solver,
        inner_loss: Loss,
        outer_loss: Loss,
        data: DomainData,
        config: TrainerConfig | None = None,
        inner_optimizer: OptimizerFactory | None = None,
        outer_optimizer: OptimizerFactory | None = None,
        inner_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        device: torch.device | str | None = None,
        run_dir: str | Path | None = None,
        wandb: Any = None,
        dist: DistContext | None = None,
        seed: int = 0,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or TrainerConfig()
        self.config.validate()
        data.validate()
        if list(weights.names) != list(data.names):
            raise ConfigError(
                "weights.names",
                f"domain names {weights.names} do not match the data's {data.names}",
            )
        self.dist = dist or DistContext()
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.module = model.to(self.device)
        self.weights = weights.to(self.device)
        self.names = list(weights.names)
        self.k = len(self.names)
        self.solver = solver
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.data = data
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb = wandb if self.dist.is_main else None
        self.run_config = run_config or {}

        self.dist.broadcast_(self.weights.logits.data)
        self.net: nn.Module = self.module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model", "the model has no trainable parameters")
        self._params = params
        self._param_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        fused = self.device.type in ("cpu", "cuda")
        self.inner_opt = (inner_optimizer or _default_sgd(fused))(params)
        self._plain_sgd = (
            is_plain_sgd(self.inner_opt) and len(self.inner_opt.param_groups) == 1 and fused
        )
        self.outer_opt = (outer_optimizer or _default_adam(fused))([self.weights.logits])
        self.scheduler = inner_scheduler(self.inner_opt) if inner_scheduler else None
        self._check_solver_and_optimizers()
        # The hypergradient can reuse the last inner step's graph unless the gradient must be
        # averaged by DDP (which only hooks .backward()) or the sampler applies the weights.
        self._reuse_graph = (
            callable(getattr(solver, "solve", None))
            and not self.dist.enabled
            and self.config.sampling != "weights"
        )

        self.train_sampler = DomainSampler(
            to_device(data.train, self.device),
            self.k,
            self.config.batch_size,
            self.config.sampling,
            seed,
            self.dist.rank,
            self.dist.world_size,
        )
        self.meta_sampler = MetaSampler(
            to_device(data.meta, self.device),
            self.config.meta_batch_size,
            seed,
            self.dist.rank,
            self.dist.world_size,
        )
        self.test = to_device(data.test, self.device) if data.test is not None else None

        self.step = 0
        self.elapsed = 0.0
        self.skips = SkipCounter(self.device)
        self._one = torch.ones((), device=self.device)
        self._w = self.weights.value().detach().float()
        self._last: dict[str, Tensor] = {}
        self._resumed_from: str | None = None
        self._wandb_id: str | None = None

    # -- validation ----------------------------------------------------------------------------

    def _check_solver_and_optimizers(self) -> None:
        if isinstance(self.solver, Unrolled):
            if not is_plain_sgd(self.inner_opt):
                raise ConfigError(
                    "solver",
                    "unrolled differentiates through the trainer's inner steps, which must then "
                    "be plain SGD (torch.optim.SGD, momentum 0, weight_decay 0); use first_order, "
                    "neumann or cg with other inner optimizers",
                )
            if self.solver.steps > self.config.outer_every:
                raise ConfigError(
                    "solver.steps",
                    f"unrolls {self.solver.steps} steps but trainer.outer_every is "
                    f"{self.config.outer_every}; it must be <= outer_every",
                )
            if self.dist.enabled:
                raise ConfigError(
                    "solver", "unrolled is not supported under torchrun; use first_order or cg"
                )
        if isinstance(self.outer_opt, MirrorDescent):
            smoothing = any(g["smoothing"] > 0 for g in self.outer_opt.param_groups)
            allowed = ("softmax",) if smoothing else ("softmax", "exp")
            if self.weights.parametrization not in allowed:
                raise ConfigError(
                    "weights.parametrization",
                    f"mirror descent needs {' or '.join(allowed)} weights, got "
                    f"{self.weights.parametrization!r}",
                )

    # -- one step of each kind -------------------------------------------------------------------

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _with_autocast(self, fn: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
        if self.config.precision != "bf16":
            return fn

        def wrapped(params):
            with self._autocast():
                return fn(params).float()

        return wrapped

    def _inner_lr(self) -> float:
        if self.config.inner_lr is not None:
            return float(self.config.inner_lr)
        return float(self.inner_opt.param_groups[0]["lr"])

    def _objective(self, per_example: Tensor, losses: Tensor) -> Tensor:
        if self.config.sampling == "weights":  # the sampler already applied the weights
            return per_example.mean()
        return torch.dot(self._w, losses)

    def _found_inf(self, *values: Tensor, tensors: list[Tensor] | None = None) -> Tensor:
        """1.0 if any of ``tensors`` (default: the gradients) or ``values`` is NaN/inf."""
        if tensors is None:
            tensors = [p.grad for p in self._params if p.grad is not None]
        return found_inf([*tensors, *(v.detach().reshape(-1) for v in values)], self._one)

    def _inner_update(self, found: Tensor) -> None:
        if self._plain_sgd:
            plain_sgd_step(self._params, self.inner_opt.param_groups[0]["lr"], found)
        else:
            guarded_step(self.inner_opt, found)

    def _inner_step(self, batch: dict[str, Any], keep_graph: bool = False) -> InnerProducts | None:
        """One optimizer step on the weighted mixture.

        With ``keep_graph`` the step's gradient is taken with ``create_graph=True``, at copies of
        the parameters and with the weights as a leaf, and returned as :class:`InnerProducts`:
        the hypergradient then gets J_L v (and H u) at theta_{T-1} from this graph instead of
        running a new forward and backward. The copies matter: optimizers update parameters in
        place, and fused kernels do so without bumping autograd's version counters, so a graph
        built on the parameters themselves would silently read theta_T.
        """
        inverse = self.train_sampler.inverse_counts
        if keep_graph:
            theta = [p.detach().clone().requires_grad_(True) for p in self._params]
            per_domain = make_per_domain_loss(self.module, batch, self.inner_loss, self.k, inverse)
            losses = self._with_autocast(per_domain)(dict(zip(self._param_names, theta)))
            w = self._w.clone().requires_grad_(True)
            objective = torch.dot(w, losses)
            grads = torch.autograd.grad(
                objective, theta, create_graph=True, allow_unused=True, materialize_grads=True
            )
            for p, g in zip(self._params, grads):
                p.grad = g.detach()
            products = InnerProducts(grads, theta, w, losses)
        else:
            with self._autocast():
                per_example = self.inner_loss(forward_batch(self.net, batch), batch).float()
            losses = segment_mean(per_example, batch["domain"], self.k, inverse)
            objective = self._objective(per_example, losses)
            objective.backward()
            products = None
        found = self._found_inf(objective)
        self._inner_update(found)
        if self.scheduler is not None:
            self.scheduler.step()
        self.skips.add(found, inner=True)
        self._last["inner_loss"] = objective.detach()
        self._last["domain_loss"] = losses.detach()
        return products

    def _meta_gradient(self) -> list[Tensor]:
        """grad M at the current parameters on a meta batch (marked NaN if M is not finite)."""
        meta = self.meta_sampler.next()
        with self._autocast():
            value = self.outer_loss(forward_batch(self.module, meta), meta).float()
        return grad_of_outer_value(value, self._params)

    def _graph_hypergradient_step(self, products: InnerProducts) -> None:
        """Hypergradient from the last inner step's graph (see :meth:`_window`)."""
        grad_values = self.solver.solve(products, self._meta_gradient(), self._inner_lr())
        if isinstance(self.outer_opt, MirrorDescent):
            grad = grad_values
        else:
            grad = chain_through_parametrization(self.weights, grad_values)
        self._outer_step(grad, (~torch.isfinite(grad).all()).float())

    def _outer_step(self, grad: Tensor, found: Tensor) -> None:
        logits = self.weights.logits
        logits.grad = grad.to(logits.dtype)
        guarded_step(self.outer_opt, found)
        self.skips.add(found, inner=False)
        self._w = self.weights.value().detach().float()

    def _hypergradient_step(self, batch: dict[str, Any], inverse_counts: Tensor | None) -> None:
        meta = self.meta_sampler.next()
        per_domain = self._with_autocast(
            make_per_domain_loss(self.module, batch, self.inner_loss, self.k, inverse_counts)
        )
        outer = self._with_autocast(make_outer_loss(self.module, meta, self.outer_loss))
        wrt = "values" if isinstance(self.outer_opt, MirrorDescent) else "logits"
        grad = hypergradient(
            self.solver,
            per_domain,
            outer,
            trainable_params(self.module),
            self.weights,
            self._inner_lr(),
            wrt=wrt,
            reduce=self.dist.reduce if self.dist.enabled else None,
        )
        self._outer_step(grad, (~torch.isfinite(grad).all()).float())

    def _unrolled_window(self, batches: list[dict[str, Any]]) -> None:
        """``len(batches)`` differentiable SGD steps, then the exact hypergradient through them."""
        names = self._param_names
        current = [p.detach().requires_grad_(True) for p in self._params]
        w = self._w.clone().requires_grad_(True)
        lr = self._inner_lr()
        objectives = []
        for batch in batches:
            per_domain = self._with_autocast(
                make_per_domain_loss(
                    self.module, batch, self.inner_loss, self.k, self.train_sampler.inverse_counts
                )
            )
            losses = per_domain(dict(zip(names, current)))
            objective = torch.dot(w, losses)
            current = sgd_step(objective, current, lr)
            objectives.append(objective)
            self._last["domain_loss"] = losses.detach()
        meta = self.meta_sampler.next()
        outer = self._with_autocast(make_outer_loss(self.module, meta, self.outer_loss))
        meta_value = outer(dict(zip(names, current)))
        (grad_w,) = torch.autograd.grad(meta_value, w, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            new = [c.detach() for c in current]
            values = torch.stack([*objectives, meta_value]).detach()
            found = self._found_inf(values, tensors=new)
            keep = found.bool()
            for p, n in zip(self._params, new):
                p.copy_(torch.where(keep, p, n))
        self._last["inner_loss"] = objectives[-1].detach()
        self.skips.add(found, inner=True, steps=len(batches))
        if isinstance(self.outer_opt, MirrorDescent):
            grad = grad_w.detach()
        else:
            grad = chain_through_parametrization(self.weights, grad_w.detach())
        self._outer_step(grad, torch.maximum(found, (~torch.isfinite(grad).all()).float()))

    def step_window(self) -> None:
        """One window: ``outer_every`` inner steps (fewer at the end of the run) and, when the
        window is complete, one outer update. For custom loops and benchmarks; :meth:`fit` runs
        windows until ``config.steps`` and adds logging, evaluation and checkpoints."""
        n = min(self.config.outer_every, self.config.steps - self.step)
        self._window(n)
        self.step += n

    def _window(self, n: int) -> None:
        """``n`` inner steps; an outer update at the end when the window is complete.

        ``unrolled`` differentiates its last ``steps`` inner steps. ``first_order``, ``neumann``
        and ``cg`` (on one process, with the loss weighted rather than the sampling) keep the
        graph of the last inner step, at theta_{T-1}, and pair it with grad M at theta_T after
        that step: for first_order this is -lr <grad L_k(theta_{T-1}), grad M(theta_T)>, the
        exact derivative of M through that SGD step; the implicit solvers take H and J_L at
        theta_{T-1}, one step from theta_T. Neither needs another forward pass.
        """
        cfg = self.config
        complete = n == cfg.outer_every and cfg.learn_weights
        unroll = self.solver.steps if isinstance(self.solver, Unrolled) and complete else 0
        reuse = complete and not unroll and self._reuse_graph
        batch = None
        for _ in range(n - unroll - reuse):
            batch = self.train_sampler.next(self._w)
            self._inner_step(batch)
        if reuse:
            products = self._inner_step(self.train_sampler.next(self._w), keep_graph=True)
            self._graph_hypergradient_step(products)
        elif unroll:
            self._unrolled_window([self.train_sampler.next(self._w) for _ in range(unroll)])
        elif complete:
            inverse = self.train_sampler.inverse_counts
            if cfg.sampling == "weights":  # every domain needs examples for its hypergradient
                batch = self.train_sampler.next_uniform()
                inverse = self.train_sampler.uniform_inverse_counts
            self._hypergradient_step(batch, inverse)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train for ``config.steps`` inner steps (from the resumed step); returns the summary."""
        cfg = self.config
        self.log = RunLog(
            self.run_dir,
            self.wandb,
            self.dist.is_main,
            cfg.progress,
            cfg.steps,
            self.step,
            self.step if self._resumed_from else None,
            self.run_config,
            self._wandb_id,
        )
        self._wandb_id = self.log.wandb_id
        started = time.perf_counter()
        try:
            while self.step < cfg.steps:
                before = self.step
                self.step_window()
                self.log.advance(self.step - before)
                last = self.step >= cfg.steps
                if _crossed(cfg.log_every, before, self.step) or last:
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    record = self._log()
                    if _crossed(cfg.eval_every, before, self.step) and not last:
                        self._evaluate()
                    if self.skips.consecutive.item() >= cfg.max_skipped:
                        self._checkpoint()
                        raise NonFiniteError(
                            f"stopped at step {self.step}: "
                            f"{int(self.skips.consecutive.item())} consecutive non-finite updates "
                            f"(trainer.max_skipped={cfg.max_skipped}); last record: {record}; "
                            "checkpoint written"
                        )
                if _crossed(cfg.checkpoint_every, before, self.step) and not last:
                    self._checkpoint()
            self.elapsed += time.perf_counter() - started
            return self._finish()
        finally:
            self.log.close()

    # -- outputs --------------------------------------------------------------------------------

    @torch.no_grad()
    def meta_loss(self) -> float:
        """The outer loss on the whole meta set (averaged over ranks)."""
        was = self.module.training
        self.module.eval()
        columns = self.meta_sampler.columns
        with self._autocast():
            value = self.outer_loss(forward_batch(self.module, columns), columns)
        self.module.train(was)
        return float(self.dist.reduce([value.float().reshape(1)])[0].item())

    def _log(self) -> dict[str, Any]:
        weights = self.weights.as_dict()
        last = self._last
        record: dict[str, Any] = {
            "step": self.step,
            "weights": weights,
            "inner_loss": float(last["inner_loss"].item()) if last else math.nan,
            "meta_loss": self.meta_loss(),
            "domain_loss": dict(zip(self.names, last["domain_loss"].tolist())) if last else {},
            "skipped_steps": self.skips.totals()["skipped_steps"],
            "inner_lr": self._inner_lr(),
            "elapsed_s": round(self.elapsed, 3),
        }
        self.log.write(record)
        shown = dict(list(weights.items())[:6])
        self.log.show(inner=record["inner_loss"], meta=record["meta_loss"], **shown)
        return record

    def evaluate(self) -> dict[str, float]:
        """Test-set metrics of the current model ({} without a test set)."""
        if self.test is None or self.data.evaluate is None:
            return {}
        return self.data.evaluate(self.module, self.test, self.device)

    def _evaluate(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.log.write({"step": self.step, "test": metrics})
        return metrics

    def _finish(self) -> dict[str, Any]:
        test = self._evaluate()
        agree = self.dist.all_equal(self.weights.logits.detach())
        summary = {
            "weights": self.weights.as_dict(),
            "meta_loss": self.meta_loss(),
            "test": test,
            "steps": self.step,
            "wall_time_s": round(self.elapsed, 3),
            "solver": self.solver.name,
            "solver_options": _options(self.solver),
            "parametrization": self.weights.parametrization,
            **self.skips.totals(),
            "world_size": self.dist.world_size,
            "ranks_agree": bool(agree),
            "seed": self.seed,
            "info": self.data.info,
        }
        if self._resumed_from:
            summary["resumed_from"] = self._resumed_from
        self._checkpoint()
        self.log.finish(summary)
        return summary

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizers, logits, RNG, samplers, step."""
        local = {
            "rng": ckpt.capture_rng(),
            "samplers": {
                "train": self.train_sampler.state_dict(),
                "meta": self.meta_sampler.state_dict(),
            },
        }
        per_rank = self.dist.gather_objects(local)
        return {
            "version": 1,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "names": self.names,
            "parametrization": self.weights.parametrization,
            "model": self.module.state_dict(),
            "weights": self.weights.state_dict(),
            "inner_optimizer": self.inner_opt.state_dict(),
            "outer_optimizer": self.outer_opt.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "counters": self.skips.state_dict(),
            "last": self._last,
            "ranks": per_rank,
            "wandb_id": self._wandb_id,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                "resume",
                f"the checkpoint's domain names {list(state['names'])} differ from "
                f"the config's {self.names}",
            )
        if state["parametrization"] != self.weights.parametrization:
            raise ConfigError(
                "resume",
                f"the checkpoint's parametrization {state['parametrization']!r} differs "
                f"from the config's {self.weights.parametrization!r}",
            )
        if len(state["ranks"]) != self.dist.world_size:
            raise ConfigError(
                "resume",
                f"the checkpoint was written by {len(state['ranks'])} rank(s), this run "
                f"has {self.dist.world_size}",
            )
        self.module.load_state_dict(state["model"])
        self.weights.load_state_dict(state["weights"])
        self.inner_opt.load_state_dict(state["inner_optimizer"])
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        local = state["ranks"][self.dist.rank]
        ckpt.restore_rng(local["rng"])
        self.train_sampler.load_state_dict(local["samplers"]["train"])
        self.meta_sampler.load_state_dict(local["samplers"]["meta"])
        self.skips.load_state_dict(state["counters"])
        self._last = {k: v.to(self.device) for k, v in state["last"].items()}
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self._w = self.weights.value().detach().float()
        self._wandb_id = state.get("wandb_id")
        self._resumed_from = source

    def resume(self, path: str | Path) -> None:
        """Continue from a run directory (its ``checkpoints/last.pt``) or a checkpoint file."""
        path = Path(path)
        file = path / "checkpoints" / "last.pt" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                "resume", f"no checkpoint at {file} (expected <run dir>/checkpoints/last.pt)"
            )
        self.load_state_dict(ckpt.load(file, map_location=self.device), source=str(path))

    def _checkpoint(self) -> None:
        state = self.state_dict()  # a collective under torchrun: every rank takes part
        if self.run_dir is not None and self.dist.is_main:
            ckpt.save_atomic(state, self.run_dir / "checkpoints" / "last.pt")


def _crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after] (never for every = 0)."""
    return bool(every) and after // every > before // every


def _options(solver: Solver) -> dict[str, Any]:
    if is_dataclass(solver):
        return {
            f.name: getattr(solver, f.name)
            for f in fields(solver)
            if f.name != "name" and not f.name.startswith("_")
        }
    return {}


def _default_sgd(fused: bool) -> OptimizerFactory:
    return lambda params: torch.optim.SGD(params, lr=0.1, fused=fused)


def _default_adam(fused: bool) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=0.05, fused=fused)
