"""Building the inner optimizer and its learning-rate schedule, and checking both before
training: a bad setting (a negative or ``nan`` learning rate, ``fused=maybe``, a scheduler that
steps on a metric or divides by zero at step 1) is one line naming the field, not a traceback
from inside torch after the run has started."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import ConfigError, first_line, is_bool, is_finite_number
from bilevel.outer import MirrorDescent

__all__ = [
    "check_holds_exactly",
    "check_hyperparameters",
    "default_sgd",
    "make_optimizer",
    "make_outer_optimizer",
    "make_scheduler",
    "rehearse_schedule",
    "shadow_groups",
]

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


def make_optimizer(factory: OptimizerFactory, params: list, field: str) -> torch.optim.Optimizer:
    """``factory(params)``; a bad setting (e.g. a negative learning rate) becomes one line."""
    if isinstance(factory, torch.optim.Optimizer):
        raise ConfigError(
            field,
            f"takes a function of the parameters, e.g. functools.partial(torch.optim."
            f"{type(factory).__name__}, lr=0.1), not an optimizer already built (the trainer "
            "builds it over the tensors it trains)",
        )
    try:
        optimizer = factory(params)
    except (ValueError, TypeError) as err:
        message = not_a_number(factory) or str(err)
        if "unexpected keyword argument 'fused'" in message:
            message += f" (this optimizer has no fused kernel: drop the key, ~{field}.fused)"
        raise ConfigError(field, message) from None
    check_hyperparameters(optimizer, field)
    return optimizer


def make_scheduler(
    factory: Callable[[torch.optim.Optimizer], Any] | None,
    optimizer: torch.optim.Optimizer,
    steps: int | None = None,
) -> Any:
    """``factory(optimizer)``, checked: the trainer steps it once per inner step with no
    argument, so a scheduler that steps on a metric (``ReduceLROnPlateau``) is refused at start
    (it failed at the first step with ``step() missing 1 required positional argument``)."""
    if factory is None:
        return None
    field = "trainer.inner_scheduler"
    if hasattr(factory, "optimizer") and callable(getattr(factory, "step", None)):
        raise ConfigError(
            field,
            f"takes a function of the optimizer, e.g. functools.partial(torch.optim.lr_scheduler."
            f"{type(factory).__name__}, ...), not a scheduler already built (the trainer builds "
            "its own optimizer)",
        )
    before = shadow_groups(optimizer)  # building the scheduler changes the groups' lr
    try:
        scheduler = factory(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(field, str(err)) from None
    step = getattr(scheduler, "step", None)
    if not callable(step):
        raise ConfigError(
            field, f"must build a learning-rate scheduler (with .step()), got {scheduler!r}"
        )
    try:
        required = [
            p.name
            for p in inspect.signature(step).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if required:
        raise ConfigError(
            field,
            f"{type(scheduler).__name__}.step needs {', '.join(required)}; the trainer steps "
            "the scheduler once per inner step without arguments: use a schedule of steps "
            "(e.g. trainer/inner_scheduler=cosine, or LinearLR, OneCycleLR)",
        )
    if steps is not None:
        rehearse_schedule(factory, type(optimizer), before, steps, field)
    return scheduler


#: a rehearsal stops after this much wall time (a schedule of millions of steps is rare, and
#: the steps it did rehearse are still checked)
REHEARSAL_SECONDS = 2.0


def shadow_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's parameter groups with one CPU scalar each in place of the parameters
    and no kernel choice (``fused``, ``foreach``, ``capturable``: they do not change a
    schedule), to build a shadow optimizer of the same class from."""

    def copy(value: Any) -> Any:  # a tensor lr is filled in place by torch's schedulers
        if isinstance(value, Tensor):
            return value.detach().clone()
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value

    groups = []
    for group in optimizer.param_groups:
        shadow = {k: copy(v) for k, v in group.items() if k != "params"}
        shadow["params"] = [torch.zeros(1)]
        for key, off in (("fused", None), ("foreach", None), ("capturable", False)):
            if key in shadow:
                shadow[key] = off
        groups.append(shadow)
    return groups


def rehearse_schedule(
    factory: Callable[[torch.optim.Optimizer], Any],
    optimizer_class: type[torch.optim.Optimizer],
    groups: list[dict[str, Any]],
    steps: int,
    field: str = "trainer.inner_scheduler",
) -> None:
    """Step a second copy of the schedule through the run's ``steps`` inner steps before any
    training, on a shadow optimizer (``optimizer_class`` over :func:`shadow_groups`, taken
    before the real scheduler changed them).

    A schedule that fails part-way (``CosineAnnealingLR`` with ``T_max=0`` divides by zero at
    the first step; ``OneCycleLR`` with ``total_steps`` below ``trainer.steps`` raises once it
    runs out) stopped the run with a traceback after minutes of work; one that gives a
    negative or non-finite learning rate (a ``LambdaLR``) trained the wrong way or to ``nan``
    with no word about why; one that is 0 at every step moved nothing. Each is one line here.
    Nothing is checked where the shadow cannot be built (an optimizer class that needs more
    than its parameter groups): the real run is then the check.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shadow = optimizer_class(groups)
            schedule = factory(shadow)
    except Exception:  # noqa: BLE001 - a best-effort check; the real build succeeded
        return
    name = type(schedule).__name__
    moved = False
    deadline = time.monotonic() + REHEARSAL_SECONDS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for step in range(1, steps + 1):
            for group in shadow.param_groups:
                lr = _learning_rate(group)
                if not is_finite_number(lr) or lr < 0:
                    raise ConfigError(
                        field,
                        f"{name} gives learning rate {lr!r} at inner step {step}; a schedule "
                        "must give finite learning rates >= 0",
                    )
                moved = moved or lr > 0
            try:
                schedule.step()
            except (ArithmeticError, TypeError, ValueError) as err:
                raise ConfigError(
                    field,
                    f"{name} fails at inner step {step} of trainer.steps={steps} "
                    f"({type(err).__name__}: {first_line(str(err))}); check its settings "
                    "against the run's length",
                ) from None
            if time.monotonic() > deadline:
                return
    if not moved:
        raise ConfigError(
            field, f"{name} gives learning rate 0 at every inner step: nothing would move"
        )


def check_holds_exactly(
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, Tensor]],
    field: str,
    of: str,
    hint: str = "",
) -> None:
    """``ConfigError`` unless ``optimizer`` holds exactly the tensors of ``named``.

    An optimizer over fewer tensors (a factory that keeps part of what it is given) still had
    every inner tensor moved by the trainer's fused SGD step and counted as an inner variable
    by the hypergradient; an outer optimizer over other tensors left the weights where they
    started, and both runs ended with exit 0. ``of`` names the set (``"trainable tensors of
    the model"``)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    ids = {id(p) for _, p in named}
    missing = [n for n, p in named if id(p) not in held]
    extra = len(held - ids)
    problems = []
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        problems.append(f"leaves out {len(missing)} of the {len(named)} {of} ({shown})")
    if extra:
        problems.append(f"holds {extra} tensor(s) that are not {of}")
    if problems:
        raise ConfigError(
            field,
            f"{' and '.join(problems)}: it must hold exactly the tensors it is given" + hint,
        )


def check_hyperparameters(optimizer: torch.optim.Optimizer, field: str) -> None:
    """Refuse what torch's own checks let through: an ``inf`` or ``nan`` learning rate (torch
    only refuses a negative one), a zero one (nothing would ever move), or another non-finite
    number among the group's settings (momentum, betas, eps, weight decay). Each would train
    to non-finite values and stop with exit 3 far from its cause. A switch (``fused``,
    ``nesterov``, ...) given as anything but true, false or null is refused: torch takes
    ``fused=maybe`` as on."""
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            if _not_a_switch(key, value):
                raise ConfigError(f"{field}.{key}", f"must be true or false, got {value!r}")
            values = value if isinstance(value, tuple | list) else [value]
            for item in values:
                number = (
                    float(item) if isinstance(item, torch.Tensor) and item.numel() == 1 else item
                )
                if isinstance(number, float) and not is_finite_number(number):
                    raise ConfigError(f"{field}.{key}", f"must be a finite number, got {item!r}")
        lr = _learning_rate(group)
        if isinstance(lr, int | float) and not lr > 0:
            raise ConfigError(f"{field}.lr", f"must be > 0 (nothing would move), got {lr!r}")


def _learning_rate(group: dict[str, Any]) -> Any:
    """A parameter group's ``lr`` as a number (a tensor lr read to the host; before training)."""
    lr = group.get("lr")
    return float(lr) if isinstance(lr, torch.Tensor) else lr


#: torch optimizers' switches: anything but true, false or null is truthy to torch
_SWITCHES = (
    "amsgrad",
    "capturable",
    "centered",
    "decoupled_weight_decay",
    "differentiable",
    "foreach",
    "fused",
    "maximize",
    "nesterov",
)


def _not_a_switch(key: str, value: Any, default: Any = None) -> bool:
    """Whether ``value`` is given for an on/off setting (a known switch, or one whose default
    is a bool) as anything but true, false or null."""
    switch = key in _SWITCHES or isinstance(default, bool)
    return switch and value is not None and not is_bool(value)


def not_a_number(factory: OptimizerFactory) -> str | None:
    """For a partial optimizer (what Hydra's ``_partial_`` builds) given a string where the
    optimizer's own default is a number (``lr=abc``): say so, instead of the comparison error
    torch raises from inside its checks. A switch given as anything but true/false/null
    (``fused=maybe``, ``nesterov=1``) is refused too: torch reads it as truthy."""
    keywords = getattr(factory, "keywords", None) or {}
    try:
        defaults = inspect.signature(factory.func).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None
    for key, value in keywords.items():
        default = defaults[key].default if key in defaults else None
        if (
            isinstance(value, str)
            and isinstance(default, (int, float))
            and not isinstance(default, bool)
        ):
            return f"{key} must be a number, got {value!r}"
        if _not_a_switch(key, value, default):
            return f"{key} must be true or false, got {value!r}"
    return None


def default_sgd(fused: bool) -> OptimizerFactory:
    return lambda params: torch.optim.SGD(params, lr=0.1, fused=fused)


def default_adam(fused: bool) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=0.05, fused=fused)


def make_outer_optimizer(
    factory: OptimizerFactory | None, weights: Any, device: torch.device, world_size: int
) -> torch.optim.Optimizer:
    """The outer optimizer over the weights' parameters (default Adam, lr 0.05, fused where
    the device has the kernel), checked: it must hold exactly those parameters, and mirror
    descent needs domain weights it can act on."""
    field = "trainer.outer_optimizer"
    fused = device.type in ("cpu", "cuda")
    optimizer = make_optimizer(factory or default_adam(fused), list(weights.parameters()), field)
    check_holds_exactly(
        optimizer, list(weights.named_parameters()), field, "parameters of the weights"
    )
    if getattr(weights, "per_example", False):
        if isinstance(optimizer, MirrorDescent):
            raise ConfigError(
                field,
                "mirror descent acts on domain weights on the simplex; per-example weights' "
                "parameters need a torch optimizer (adam, sgd, lazy_adam)",
            )
        if world_size > 1:
            raise ConfigError(
                "weights",
                f"weights={weights.parametrization} runs in one process (no torchrun) for now",
            )
        return optimizer
    if isinstance(optimizer, MirrorDescent):
        smoothing = any(g["smoothing"] > 0 for g in optimizer.param_groups)
        allowed = ("softmax",) if smoothing else ("softmax", "exp")
        if weights.parametrization not in allowed:
            raise ConfigError(
                "weights.parametrization",
                f"mirror descent needs {' or '.join(allowed)} weights, got "
                f"{weights.parametrization!r}",
            )
    return optimizer
