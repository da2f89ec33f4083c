"""The inner schedule is rehearsed over the run's steps before training: a schedule that fails
part-way, goes negative or non-finite, or never moves is one line, and the rehearsal leaves the
real optimizer and scheduler as building them alone would."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.optim import lr_scheduler

from bilevel.errors import ConfigError
from bilevel.trainer.optimizers import make_scheduler


def sgd(**kwargs):
    return torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, **kwargs)


@pytest.mark.parametrize(
    ("factory", "steps", "message"),
    [
        (
            functools.partial(lr_scheduler.CosineAnnealingLR, T_max=0),
            10,
            r"CosineAnnealingLR fails at inner step 1 of trainer.steps=10 \(ZeroDivisionError",
        ),
        (
            functools.partial(lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=50),
            100,
            r"OneCycleLR fails at inner step 51 of trainer.steps=100 \(ValueError",
        ),
        (
            functools.partial(lr_scheduler.LambdaLR, lr_lambda=lambda s: 1 - s / 50),
            100,
            r"LambdaLR gives learning rate -0.002\d* at inner step 52",
        ),
        (
            functools.partial(
                lr_scheduler.LambdaLR, lr_lambda=lambda s: float("nan") if s else 1.0
            ),
            5,
            r"LambdaLR gives learning rate nan at inner step 2",
        ),
        (
            functools.partial(lr_scheduler.LambdaLR, lr_lambda=lambda s: 0.0),
            5,
            r"LambdaLR gives learning rate 0 at every inner step: nothing would move",
        ),
    ],
)
def test_a_schedule_that_breaks_within_the_run_is_one_line(factory, steps, message):
    with pytest.raises(ConfigError, match=rf"^trainer.inner_scheduler: {message}"):
        make_scheduler(factory, sgd(), steps)


def test_a_schedule_that_breaks_only_after_the_run_is_accepted():
    """OneCycleLR over exactly the run's steps, and a schedule that turns negative one step
    after the last one, train correctly."""
    one_cycle = make_scheduler(
        functools.partial(lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=100), sgd(), 100
    )
    linear = make_scheduler(
        functools.partial(lr_scheduler.LambdaLR, lr_lambda=lambda s: 1 - s / 100), sgd(), 100
    )
    # the rehearsal steps a copy: the schedules handed back start at their first step
    assert isinstance(one_cycle, lr_scheduler.OneCycleLR) and one_cycle.last_epoch == 0
    assert isinstance(linear, lr_scheduler.LambdaLR) and linear.last_epoch == 0


@pytest.mark.parametrize(
    "factory",
    [
        functools.partial(lr_scheduler.LinearLR, start_factor=0.1, total_iters=10),
        functools.partial(lr_scheduler.OneCycleLR, max_lr=0.5, total_steps=20),
        functools.partial(lr_scheduler.StepLR, step_size=3, gamma=0.5),
    ],
)
def test_the_rehearsal_leaves_the_real_schedule_as_built_alone(factory):
    """Both optimizers step the same schedule 20 times: same learning rates, same momentum
    (OneCycleLR cycles it), whether or not the schedule was rehearsed first."""
    lrs = []
    for steps in (None, 20):
        optimizer = sgd(momentum=0.9, fused=True)
        scheduler = make_scheduler(factory, optimizer, steps)
        seen = []
        for _ in range(20):
            optimizer.step()
            scheduler.step()
            seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]))
        lrs.append(seen)
    assert lrs[0] == lrs[1]


def test_the_rehearsal_leaves_a_tensor_learning_rate_alone():
    """torch's schedulers fill a tensor lr in place: a shadow sharing it would have moved the
    real optimizer's learning rate to the end of the schedule before the first step."""
    optimizer = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=torch.tensor(0.1))
    make_scheduler(functools.partial(lr_scheduler.StepLR, step_size=1, gamma=0.5), optimizer, 30)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.1)


def test_an_optimizer_whose_fused_kernel_was_turned_off_skips_on_the_host():
    # torch keeps an optimizer built fused=True marked as able to skip on the device after a
    # group turns the kernel off (the trainer does under FSDP): the step then failed
    from bilevel.optim import guarded_step, supports_device_skip

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9, fused=True)
    assert supports_device_skip(opt)
    opt.param_groups[0]["fused"] = False
    assert not supports_device_skip(opt)
    p.grad = torch.ones(3)
    guarded_step(opt, torch.zeros(()))
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.5))
    p.grad = torch.ones(3)
    guarded_step(opt, torch.ones(()))  # found: skipped
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.5))
