"""``BilevelTrainer``: the loop that learns domain weights while training a model.

One *window* is ``outer_every`` inner optimizer steps on the weighted mixture sum_k w_k L_k,
ending with one outer update of the weights. What happens inside a window belongs to the outer
method (:mod:`bilevel.methods`: a hypergradient solver, the unrolled window, ScaleBiO, a bandit,
...), how the model is spread over processes to the strategy (:mod:`bilevel.strategies`: ddp,
fsdp). This module is the loop around them: it applies the outer update, logs, evaluates,
checkpoints and stops on non-finite values; it branches on neither.

Everything in the loop stays on the model's device. The host reads values back only at log,
evaluation and checkpoint events: non-finite steps are detected on the device and skipped by the
optimizers themselves (``found_inf``, as AMP's grad scaler does), and counted in device tensors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
from bilevel.data.columns import to_device
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import checked_metrics
from bilevel.data.prefix_cache import cache_prefix
from bilevel.errors import ConfigError, NonFiniteError, check_seed, resolve_device
from bilevel.files import write_text_atomic
from bilevel.functional import forward_batch
from bilevel.hypergradient import Solver
from bilevel.logging import RunLog
from bilevel.logging import run_dir as run_dirs
from bilevel.methods import OuterMethod, OuterUpdate, method_for
from bilevel.methods.apply import apply_update
from bilevel.methods.checks import check_fsdp_solver
from bilevel.methods.fixed import FixedWeights
from bilevel.strategies import DDPStrategy, Strategy, build_strategy, fsdp_needs_processes
from bilevel.strategies.distributed import DistContext
from bilevel.trainer import notes, records
from bilevel.trainer import state as trainer_state
from bilevel.trainer.checks import (
    check_arguments,
    check_batch_sizes,
    check_losses,
    choose_evaluator,
    outer_gradient,
    rows_for,
)
from bilevel.trainer.config import TrainerConfig
from bilevel.trainer.inner_loop import InnerLoop
from bilevel.trainer.optimizers import make_outer_optimizer
from bilevel.trainer.stopping import StopRequested, stop_requests
from bilevel.trainer.views import TrainerViews
from bilevel.weights import DomainWeights

__all__ = ["BilevelTrainer", "NonFiniteError", "TrainerConfig"]

log = logging.getLogger("bilevel")
progress = logging.getLogger("bilevel.progress")

Loss = Callable[[Any, Any], Tensor]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


class BilevelTrainer(TrainerViews):
    """Learns domain weights for ``model`` on ``data`` with ``solver``.

    Args:
        model: any ``nn.Module``; called as ``model(batch["x"])`` (or ``model(**batch["x"])``).
        weights: the :class:`DomainWeights`, one per ``data.names`` entry in the same order.
        solver: from :func:`bilevel.solvers.build` (a hypergradient solver or another outer
            method, see :mod:`bilevel.methods`), or a solver's name (its defaults).
        inner_loss: ``(output, batch) -> [B]`` per-example loss.
        outer_loss: ``(output, batch) -> scalar`` meta loss.
        data: the :class:`~bilevel.data.DomainData`.
        config: loop settings (a :class:`TrainerConfig`, or a dict of its fields).
        inner_optimizer: ``params -> Optimizer`` (default SGD, lr 0.1, fused).
        outer_optimizer: ``params -> Optimizer`` for the logits (default Adam, lr 0.05, fused), or
            :class:`~bilevel.outer.MirrorDescent` (exponentiated gradient, as in DoReMi).
        inner_scheduler: optional ``optimizer -> LRScheduler``, stepped every inner step.
        device: where everything runs (default: the model's device).
        run_dir: where ``metrics.jsonl``, ``summary.json``, ``weights.png`` and
            ``checkpoints/last.pt`` go (``None``: nothing is written). It must be new, empty,
            or a run directory bilevel created; one that holds an earlier run is refused at
            :meth:`fit` unless this trainer resumed that run (:meth:`resume`).
        loggers: trackers the records also go to: :class:`~bilevel.logging.WandbLogger`,
            :class:`~bilevel.logging.TensorBoardLogger`, :class:`~bilevel.logging.MLflowLogger`,
            or one's own object with ``name``, ``start``, ``log`` and ``finish``.
        wandb: one more tracker (kept for code written before ``loggers``).
        dist: the data-parallel context (default: one process).
        strategy: how the model is laid out (default: ``config.strategy`` for ``dist``).
        run_config: the resolved config to record with the run (and in its checkpoints).
        overrides: the command-line overrides that made ``run_config`` (for resume).

    Examples:
        >>> trainer = BilevelTrainer(model, weights, build("first_order"),
        ...                          per_example_cross_entropy, cross_entropy, data)
        >>> summary = trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        weights: DomainWeights,
        solver: Solver | OuterMethod | str,
        inner_loss: Loss,
        outer_loss: Loss,
        data: DomainData,
        config: TrainerConfig | Mapping[str, Any] | None = None,
        inner_optimizer: OptimizerFactory | None = None,
        outer_optimizer: OptimizerFactory | None = None,
        inner_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        device: torch.device | str | None = None,
        run_dir: str | Path | None = None,
        wandb: Any = None,
        loggers: list[Any] | None = None,
        dist: DistContext | None = None,
        seed: int = 0,
        run_config: dict[str, Any] | None = None,
        strategy: Strategy | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        solver, config = check_arguments(model, weights, solver, data, config)
        self.config = config
        self.config.validate()
        data.validate()
        if list(weights.names) != list(data.names):
            raise ConfigError(
                "weights.names",
                f"domain names {weights.names} do not match the data's {data.names}",
            )
        self.device = resolve_device(device) if device else next(model.parameters()).device
        if config.cache_prefix:  # before anything reads the data: every split gets the cache
            store = config.prefix_cache_dir
            data = cache_prefix(model.to(self.device), data, self.device, store=store)
        data = rows_for(weights, data)
        seed = check_seed(seed)
        if self.config.strategy == "fsdp":
            check_fsdp_solver(solver)
        dist = dist or DistContext()
        if strategy is None:
            strategy = (
                build_strategy(self.config.strategy, dist, self.device, self.config.precision)
                if dist.enabled
                else DDPStrategy(dist, self.device)
            )
        if self.config.strategy == "fsdp" and strategy.name != "fsdp":
            raise fsdp_needs_processes()
        self.strategy = strategy
        check_batch_sizes(self.config, strategy.world_size)
        self.module = model.to(self.device)
        self.weights = weights.to(self.device)
        self.names = list(weights.names)
        self.k = len(self.names)
        self.solver = solver
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.data = data
        self.seed = seed
        # every rank writes where rank 0 does (its shards, under fsdp)
        run_dir = strategy.broadcast_object(str(run_dir) if run_dir is not None else None)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        trackers = [x for x in [*(loggers or []), wandb] if x is not None]
        self.loggers = trackers if strategy.is_main else []
        self.run_config = run_config or {}
        self.overrides = list(overrides or [])
        outer_has_grad = check_losses(self.module, inner_loss, outer_loss, data, self.device)
        for p in self.weights.parameters():
            strategy.broadcast_(p.data)
        self.trainable_keys, self.frozen = trainer_state.checkpoint_keys(self.module)
        self.loop = InnerLoop(
            self.module,
            self.weights,
            inner_loss,
            outer_loss,
            data,
            self.config,
            strategy,
            self.device,
            seed,
            inner_optimizer,
            inner_scheduler,
        )
        #: what the optimizers were made by (``None``: the default), recorded in config.json
        self.factories = {
            "inner_optimizer": inner_optimizer,
            "outer_optimizer": outer_optimizer,
            "inner_scheduler": inner_scheduler,
        }
        self.outer_opt = make_outer_optimizer(
            outer_optimizer, self.weights, self.device, strategy.world_size
        )
        self.method = method_for(solver, weights)
        self.notes: list[str] = []
        if self.config.learn_weights:
            self.notes += self.method.setup(self.loop)
            self.notes += notes.sampling(self) + notes.schedule(self)
        elif getattr(self.method, "moves_weights", True) and callable(
            getattr(solver, "window", None)
        ):
            self.notes.append(
                f"trainer.learn_weights=false keeps the weights at weights.init: solver="
                f"{self.method.name} does not run (plain inner steps)"
            )
            self.method = FixedWeights(self.method.name)
        differentiates = getattr(self.method, "uses_meta", True) and getattr(
            solver, "uses_meta", True
        )
        if self.config.learn_weights and differentiates and not outer_has_grad:
            raise outer_gradient(self.method.name)
        self.notes += notes.settings(self, outer_optimizer is not None, differentiates)
        self.test = to_device(data.test, self.device) if data.test is not None else None
        self.val = to_device(data.val, self.device) if data.val is not None else None
        self.evaluator, said = choose_evaluator(self.module, data, self.device)
        self.notes += said

        self.step = 0
        self.elapsed = 0.0
        self.outer_updates = 0
        # gradient updates of this process, and how many had a nonzero gradient (a device
        # counter, read once at the end: a run whose weights never moved says why)
        self._gradient_updates = 0
        self._nonzero_updates = torch.zeros((), dtype=torch.int64, device=self.device)
        self._ranks_differ_said = False
        self._resumed_from: str | None = None
        #: this trainer has written its run directory (a second fit() continues in it)
        self._wrote_run_dir = False
        #: each tracker's run id (``{name: id}``), kept in checkpoints so a resume continues it
        self.logger_ids: dict[str, str] = {}
        self._last_checkpoint = time.monotonic()
        self.resume_file: Path | None = None
        #: a branch of another run (resumed into a new folder) starts from that run's metrics
        self.history_from: Path | None = None

    # -- one window ------------------------------------------------------------------------------

    def step_window(self) -> None:
        """One window: ``outer_every`` inner steps (fewer at the end of the run) and, when the
        window is complete, one outer update. For custom loops and benchmarks; :meth:`fit` runs
        windows until ``config.steps`` and adds logging, evaluation and checkpoints."""
        n = min(self.config.outer_every, self.config.steps - self.step)
        self._window(n)
        self.step += n

    def _window(self, n: int) -> None:
        update = n == self.config.outer_every and self.config.learn_weights
        with self.loop.window_buffers(n, update):
            result = self.method.window(self.loop, n, update)
        self._apply(result)

    def _apply(self, update: OuterUpdate | None) -> None:
        """Apply a method's outer update on the device (skipped where non-finite)."""
        if update is None:
            return
        found, moved = apply_update(self.weights, self.outer_opt, update)
        if moved is not None:
            self._gradient_updates += 1
            self._nonzero_updates += moved
        self.loop.skips.add(found, inner=False)
        self.outer_updates += 1
        self.loop.refresh_weights()

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train for ``config.steps`` inner steps (from the resumed step); returns the summary."""
        fresh = False
        try:
            with contextlib.ExitStack() as stack:
                if self.run_dir is not None and self.strategy.is_main:
                    continuing = self._wrote_run_dir or (
                        self.resume_file is not None
                        and self.run_dir.resolve() in self.resume_file.resolve().parents
                    )
                    run_dirs.check_creatable(self.run_dir, "run_dir", key="run_dir")
                    if not continuing:
                        run_dirs.check_new_run(self.run_dir, "run_dir")
                    fresh = not run_dirs.is_run_dir(self.run_dir)
                    run_dirs.claim(self.run_dir)
                    stack.enter_context(run_dirs.locked(self.run_dir))
                    self._wrote_run_dir = True
                return self._fit()
        except ConfigError:  # raised before the first record (a logger that cannot start)
            if fresh:
                run_dirs.release(self.run_dir)
            raise

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        history = self.history_from
        if history is not None and history.is_file() and self.run_dir is not None:
            if self.strategy.is_main:  # kept up to the checkpoint's step by the log below
                write_text_atomic(self.run_dir / "metrics.jsonl", history.read_text())
        if self.strategy.is_main:  # before the progress bar is drawn, not onto its line
            for note in self.notes:
                log.warning(f"note: {note}")
            if self.run_dir is not None:
                verb = "continuing" if self._resumed_from or self.step else "writing"
                log.info(f"{verb} run directory {self.run_dir}")
        self.log = RunLog(
            self.run_dir,
            self.loggers,
            self.strategy.is_main,
            cfg.progress,
            cfg.steps,
            self.step,
            # metrics.jsonl is kept up to this step when the run continues (a resume, or a
            # second fit() of this trainer with more steps)
            self.step if self._resumed_from or self.step else None,
            self.run_config,
            self.logger_ids,
        )
        self.logger_ids = dict(self.log.ids)
        if self.step == 0 and self.run_dir is not None:
            records.write_config(self)
            self.log.write(self._weights_record())
        started = time.perf_counter()
        first = self.step
        try:
            with stop_requests(enabled=self.strategy.world_size == 1) as stop:
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
                        self._stop_if_not_finite(record)
                    if not last and stop.signal is not None:  # Ctrl-C or SIGTERM: keep all
                        self.elapsed += time.perf_counter() - started
                        self._checkpoint()
                        stopped = StopRequested(stop.signal, self.step, self.run_dir)
                        log.warning(f"bilevel: {stopped}")
                        raise stopped
                    if not last and self._checkpoint_due(before, first):
                        self._checkpoint()
            self.elapsed += time.perf_counter() - started
            if self.outer_updates and self.loop.skips.totals()["skipped_outer"] >= (
                self.outer_updates
            ):
                self._checkpoint()
                raise NonFiniteError(notes.outer_skipped(self, self.outer_updates))
            # a finished run resumed with nothing to train has its test record already
            return self._finish(record_test=self.step > first or not self.log.tested_at(first))
        finally:
            self.log.close()
            close = getattr(self.loop.train_sampler, "close", None)
            if callable(close):  # a sampler over streams stops its reading thread
                close()

    def _checkpoint_due(self, before: int, first: int) -> bool:
        every = self.config.checkpoint_every
        if not every:
            return False
        if _crossed(every, before, self.step) or before == first:
            return True
        seconds = self.config.checkpoint_seconds
        due = bool(seconds) and time.monotonic() - self._last_checkpoint >= seconds
        if self.strategy.world_size > 1:  # every rank must take part in the same checkpoint
            flag = torch.tensor([float(due)], device=self.device)
            due = bool(self.strategy.reduce([flag])[0].item() > 0)
        return due

    def _stop_if_not_finite(self, record: dict[str, Any]) -> None:
        inner, outer = self.loop.skips.consecutive()
        limit = self.config.max_skipped
        if inner >= limit:
            self._checkpoint()
            raise NonFiniteError(
                f"stopped at step {self.step}: {inner} consecutive inner steps were skipped, "
                f"the inner loss or its gradient is not finite (trainer.max_skipped={limit}); "
                f"last record: {record}; {notes.CHECKPOINT_KEPT}"
            )
        if outer >= limit:
            self._checkpoint()
            raise NonFiniteError(notes.outer_skipped(self, outer))

    # -- outputs --------------------------------------------------------------------------------

    @torch.no_grad()
    def meta_loss(self) -> float:
        """The outer loss on the whole meta set (averaged over ranks)."""
        columns = self.loop.meta_sampler.columns
        with module_state.evaluation(self.module), self.loop.autocast():
            value = self.outer_loss(forward_batch(self.module, columns), columns)
        return float(self.strategy.reduce([value.float().reshape(1)])[0].item())

    def _weights_record(self) -> dict[str, Any]:
        """The starting point (step 0): initial weights and meta loss, for the plots."""
        return {"step": self.step, "weights": self.weights.as_dict(), "meta_loss": self.meta_loss()}

    def _log(self) -> dict[str, Any]:
        return records.log_record(self)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Metrics of the current model on the test set (``split="val"``: the validation
        set); ``{}`` without that set or anything to score it with."""
        columns = self.val if split == "val" else self.test
        if columns is None or self.evaluator is None:
            return {}
        # an evaluator that leaves the model in eval mode (or moves running statistics) must
        # not change the training that follows: both are put back
        with module_state.modes_kept(self.module), module_state.buffers_kept(self.module):
            return checked_metrics(self.evaluator(self.module, columns, self.device))

    def _evaluate(self) -> dict[str, float]:
        metrics = self.evaluate()
        val = self.evaluate("val")
        record = {k: v for k, v in (("test", metrics), ("val", val)) if v}
        if record:
            self.log.write({"step": self.step, **record})
        return metrics

    def _finish(self, record_test: bool = True) -> dict[str, Any]:
        # the checkpoint first: a final evaluation that fails (a bug in data.evaluate, memory
        # on a large test set) costs no training, and `resume=` evaluates again
        self._checkpoint()
        unmoved = notes.unmoved(
            self._gradient_updates, int(self._nonzero_updates.item()), self.weights
        )
        ending = [*notes.solver_notes(self.solver), *([unmoved] if unmoved else [])]
        if self.strategy.is_main:
            for note in ending:
                log.warning(f"note: {note}")
        self.notes += ending
        test = self._evaluate() if record_test else self.evaluate()
        summary = records.summary(self, test, self.evaluate("val"))
        self.log.finish(summary)
        return summary

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (:func:`bilevel.trainer.state.capture`): the
        trainable part of the model (and its buffers), optimizers, logits, RNG, samplers, the
        method's state (warm starts), step."""
        return trainer_state.capture(self)

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from ``state`` (checked first: :func:`bilevel.trainer.state.restore`)."""
        trainer_state.restore(self, state)
        self._resumed_from = source

    def resume(self, path: str | Path) -> None:
        """Continue from a run directory (its ``checkpoints/last.pt``) or a checkpoint file."""
        trainer_state.resume(self, Path(path))

    def _checkpoint(self) -> None:
        state = self.state_dict()  # a collective under torchrun: every rank takes part
        if self.run_dir is not None:
            self.strategy.save(state, self.run_dir / "checkpoints")
        self._last_checkpoint = time.monotonic()


def _crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after] (never for every = 0)."""
    return bool(every) and after // every > before // every
