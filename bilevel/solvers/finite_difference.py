"""Finite-difference products: H u and J_L v from forward and backward passes only.

The autograd products (:mod:`bilevel.solvers.products`) differentiate twice (double backward or
forward mode). That is exact, but it is not available on a sharded model (FSDP2: autograd sees
the gathered copies, not the shards) nor through fused attention kernels, and it keeps a second
graph alive. Central differences need neither:

* J_L v = [<grad L_k, v>]_k = (L(theta + eps v) - L(theta - eps v)) / (2 eps): two forward
  passes of the K per-domain losses, no graph kept;
* H u = (grad F(theta + eps u) - grad F(theta - eps u)) / (2 eps): two backward passes of the
  weighted inner loss F = sum_k w_k L_k.

The step is scaled to the point and the direction, as DARTS and SAMA do (their ``R / |v|``):
``eps = step * max(1, |theta|) / |v|``, so the perturbation ``eps v`` has the size
``step * max(1, |theta|)`` whatever the scale of v. The default relative step is the cube root of
the machine epsilon of the dtype the losses are computed in (about 6e-6 in float64, 5e-3 in
float32), which balances the O(eps^2) truncation error of a central difference against the
O(machine eps / eps) rounding error, capped at 0.01 (bfloat16). On smooth models the
hypergradients agree with autograd to about 1e-10 relative in float64, 2e-4 in float32 and 1e-2
in bfloat16 (scripts/benchmarks/bench_products.py).

Two kinds of evaluation point share the arithmetic:

* :class:`FunctionalPoint`: ``params`` given as a dict (the public API); perturbed copies are
  built, nothing is modified;
* :class:`ModulePoint`: the module's own parameters (or their local shards under FSDP) are
  perturbed in place and restored exactly by copying back a saved copy (adding and subtracting
  eps v would not restore them bit for bit).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from bilevel.functional import PerDomainLoss, check_per_domain_shape
from bilevel.solvers.products import Reduce, TensorList, poison_nonfinite, tree_dot

__all__ = [
    "FiniteDifferenceProducts",
    "FunctionalPoint",
    "ModulePoint",
    "SameRandomness",
    "default_step",
]


def default_step(dtype: torch.dtype) -> float:
    """Relative step of a central difference in ``dtype``: the cube root of its epsilon, at most
    0.01 (bfloat16's cube root, 0.2, moves the whole parameter vector by a fifth of its norm;
    0.01 measured about 15x more accurate, scripts/benchmarks/bench_products.py)."""
    return min(float(torch.finfo(dtype).eps) ** (1.0 / 3.0), 0.01)


class Point(Protocol):
    """Where the products are taken: evaluates the losses and the weighted-loss gradient at
    theta + eps * direction."""

    theta: TensorList

    def losses(self, direction: Sequence[Tensor], eps: Tensor) -> Tensor: ...

    def grad(self, direction: Sequence[Tensor], eps: Tensor) -> TensorList: ...

    def grad_and_losses(
        self, direction: Sequence[Tensor], eps: Tensor
    ) -> tuple[TensorList, Tensor]: ...


class SameRandomness:
    """Every pass at one evaluation point draws the same random numbers.

    A model with dropout (or any random layer) in training mode is a different function at each
    forward pass; the difference of two passes with different dropout masks, divided by 2 eps,
    is noise of order 1 / eps, not a derivative (measured: hypergradients of the wrong sign and
    ten times too large). The random-number state is taken when the point is built and every
    pass replays it, so the differences are those of one fixed sample of the random function,
    which is what autograd differentiates; the global random stream is left untouched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device_type = device.type
        self.cpu = torch.get_rng_state()
        self.index: int | None = None
        self.accelerator: Tensor | None = None
        if device.type != "cpu" and device.type != "meta":
            module = torch.get_device_module(device.type)
            self.index = device.index if device.index is not None else module.current_device()
            self.accelerator = module.get_rng_state(self.index)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.index] if self.index is not None else []
        device_type = self.device_type if self.index is not None else "cuda"
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.get_device_module(self.device_type).set_rng_state(
                    self.accelerator, self.index
                )
            yield


def _identity(tensors: TensorList) -> TensorList:
    return tensors


class FiniteDifferenceProducts:
    """``hvp``, ``domain_jvp`` and ``dot`` by central differences at ``point``.

    Args:
        point: a :class:`FunctionalPoint` or :class:`ModulePoint`.
        step: relative step (default: :func:`default_step` of the parameters' dtype).
        reduce: averages the K-vector across data-parallel ranks.
        grad_reduce: averages H u across ranks (``None``: the point's gradients are already
            averaged, as a :class:`ModulePoint`'s are).
        shard_sum: sums per-rank partial dot products when the vectors are shards (FSDP).
        hessian_point: take H u at another batch (the same theta), for an estimate whose H and
            J_L do not share a minibatch.
    """

    def __init__(
        self,
        point: Point,
        step: float | None = None,
        reduce: Reduce | None = None,
        grad_reduce: Reduce | None = None,
        shard_sum: Callable[[Tensor], Tensor] | None = None,
        hessian_point: Point | None = None,
    ) -> None:
        self.point = point
        self.hessian_point = hessian_point or point
        self.step = default_step(point.theta[0].dtype) if step is None else float(step)
        if not (0 < self.step < 1 and math.isfinite(self.step)):
            raise ValueError(f"finite_difference: step must lie in (0, 1), got {step!r}")
        self.reduce = reduce or _identity
        self.grad_reduce = grad_reduce or _identity
        self.shard_sum = shard_sum or (lambda t: t)
        self._theta_norm: Tensor | None = None

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return self.shard_sum(tree_dot(a, b))

    def _eps(self, direction: Sequence[Tensor]) -> Tensor:
        if self._theta_norm is None:
            self._theta_norm = self.dot(self.point.theta, self.point.theta).sqrt()
        norm = self.dot(direction, direction).sqrt()
        # A zero direction gives a zero product (the difference is 0 / 2 eps with a finite eps).
        return self.step * self._theta_norm.clamp_min(1.0) / norm.clamp_min(1e-30)

    def hvp(self, u: Sequence[Tensor]) -> TensorList:
        """H u, H = d^2 F / d theta^2 at (theta, w): two gradients."""
        eps = self._eps(u)
        diff = self.hessian_point.grad(u, eps)
        minus = self.hessian_point.grad(u, -eps)
        torch._foreach_sub_(diff, minus)  # in place: no third parameter-sized vector
        del minus
        torch._foreach_div_(diff, 2 * eps)
        return self.grad_reduce(diff)

    def hvp_jvp(self, u: Sequence[Tensor]) -> tuple[TensorList, Tensor]:
        """(H u, J_L u): the two gradient evaluations of H u also give the per-domain losses at
        theta +- eps u, hence J_L u, at no extra cost (when H and J_L share their batch)."""
        if self.hessian_point is not self.point:
            return self.hvp(u), self.domain_jvp(u)
        eps = self._eps(u)
        hu, l_plus = self.point.grad_and_losses(u, eps)
        minus, l_minus = self.point.grad_and_losses(u, -eps)
        torch._foreach_sub_(hu, minus)
        del minus
        torch._foreach_div_(hu, 2 * eps)
        hu = self.grad_reduce(hu)
        jl = poison_nonfinite((l_plus - l_minus) / (2 * eps), l_plus, l_minus)
        return hu, self.reduce([jl])[0]

    def domain_jvp(self, v: Sequence[Tensor]) -> Tensor:
        """[<grad L_k, v>]_k, shape ``[K]``: two forward passes, whatever K is."""
        eps = self._eps(v)
        plus = self.point.losses(v, eps)
        minus = self.point.losses(v, -eps)
        local = poison_nonfinite((plus - minus) / (2 * eps), plus, minus)
        return self.reduce([local])[0]


class FunctionalPoint:
    """theta as a dict of tensors; perturbed copies are evaluated, theta is never modified.

    Args:
        per_domain_loss: ``params -> [K]``.
        names, theta: the parameter names and tensors.
        w: weight values ``[K]`` of the weighted loss F (for H u).
    """

    def __init__(
        self, per_domain_loss: PerDomainLoss, names: list[str], theta: TensorList, w: Tensor
    ) -> None:
        self.fn, self.names = per_domain_loss, names
        self.theta = [t.detach() for t in theta]
        self.w = w.detach()
        self.randomness = SameRandomness(self.theta[0].device)

    def _shifted(self, direction: Sequence[Tensor], eps: Tensor) -> TensorList:
        # one tensor at a time: only the shifted copy is allocated, no eps * direction temporary
        return [t.addcmul(d, eps.to(t.dtype)) for t, d in zip(self.theta, direction)]

    @torch.no_grad()
    def losses(self, direction: Sequence[Tensor], eps: Tensor) -> Tensor:
        with self.randomness.replay():
            values = self.fn(dict(zip(self.names, self._shifted(direction, eps))))
        return check_per_domain_shape(values, self.w.numel())

    def grad_and_losses(
        self, direction: Sequence[Tensor], eps: Tensor
    ) -> tuple[TensorList, Tensor]:
        with torch.enable_grad(), self.randomness.replay():
            leaves = [t.requires_grad_(True) for t in self._shifted(direction, eps)]
            values = check_per_domain_shape(
                self.fn(dict(zip(self.names, leaves))), self.w.numel(), differentiable=True
            )
            objective = torch.dot(self.w.to(values.dtype), values)
            grads = torch.autograd.grad(
                objective, leaves, allow_unused=True, materialize_grads=True
            )
        return list(grads), values.detach()

    def grad(self, direction: Sequence[Tensor], eps: Tensor) -> TensorList:
        return self.grad_and_losses(direction, eps)[0]


class ModulePoint:
    """The module's current parameters, perturbed in place and restored bit for bit.

    Args:
        params: the parameter tensors to perturb (local shards under FSDP), in place.
        losses_fn: ``() -> [K]`` per-domain losses at the current parameters (forward only).
        grad_fn: ``() -> (grads, losses)``: the gradient of the weighted loss at the current
            parameters, already averaged across ranks and shaped like ``params``, and the
            per-domain losses ``[K]`` of the same forward pass.
        after: called after each evaluation (FSDP: drop the gathered parameters).
    """

    def __init__(
        self,
        params: TensorList,
        losses_fn: Callable[[], Tensor],
        grad_fn: Callable[[], tuple[TensorList, Tensor]],
        after: Callable[[], None] | None = None,
    ) -> None:
        self.params = params
        self.theta = [p.detach() for p in params]
        self.losses_fn, self.grad_fn = losses_fn, grad_fn
        self.after = after or (lambda: None)
        self.randomness = SameRandomness(self.theta[0].device)

    def _evaluate(self, fn, direction: Sequence[Tensor], eps: Tensor):
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for t, d in zip(self.theta, direction):
                    t.addcmul_(d, eps.to(t.dtype))
            self.after()
            with self.randomness.replay():
                return fn()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.theta, saved)
            self.after()

    def losses(self, direction: Sequence[Tensor], eps: Tensor) -> Tensor:
        def run():
            with torch.no_grad():
                return self.losses_fn()

        return self._evaluate(run, direction, eps)

    def grad_and_losses(
        self, direction: Sequence[Tensor], eps: Tensor
    ) -> tuple[TensorList, Tensor]:
        grads, losses = self._evaluate(self.grad_fn, direction, eps)
        return grads, losses.detach()

    def grad(self, direction: Sequence[Tensor], eps: Tensor) -> TensorList:
        return self.grad_and_losses(direction, eps)[0]
