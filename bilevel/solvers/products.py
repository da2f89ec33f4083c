"""Derivative products of the inner problem F(theta, w) = sum_k w_k L_k(theta).

Everything a solver needs reduces to three products, none of which materializes a matrix:

* ``grad_outer``: the gradient of the outer loss M at theta (one reverse pass);
* ``InnerProducts.hvp(u)``: H u, H the Hessian of F in theta (reverse-over-reverse on one kept
  graph of grad_theta F, so repeated products cost one double-backward each, no new forward);
* ``domain_jvp(..., v)`` and ``InnerProducts.domain_jvp(v)``: the K-vector
  [<grad L_k, v>]_k = J_L v, the Jacobian-vector product of theta -> [L_1..L_K] in direction v.
  Because w enters F linearly, d<grad_theta F, v>/dw = J_L v, so all K entries come from ONE
  product over the same graph (w is a leaf of it); its cost does not grow with K. Without a
  kept graph (first-order) the same K-vector comes from one forward-mode pass with dual
  tensors, which is cheaper than building a graph to differentiate twice.

Tensors are handled as lists in a fixed name order; the math is plain ``torch.autograd``, which
on small models has far less per-call overhead than the equivalent ``torch.func`` transforms.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from bilevel.functional import (
    OuterLoss,
    Params,
    PerDomainLoss,
    Reduce,
    TensorList,
    check_per_domain_shape,
    no_gradient_error,
)

__all__ = [
    "per_tensor",
    "scaled",
    "InnerProducts",
    "Reduce",
    "domain_jvp",
    "grad_of_outer_value",
    "grad_outer",
    "leaves",
    "poison_nonfinite",
    "tree_dot",
]


def _identity(tensors: TensorList) -> TensorList:
    return tensors


def poison_nonfinite(result: Tensor, *values: Tensor) -> Tensor:
    """``result``, or NaN where any of ``values`` is not finite (no host sync).

    A NaN loss does not always reach its derivatives (``torch.where`` with a NaN constant has a
    zero derivative), so the solvers mark their result non-finite whenever a loss value was.
    ``0 * v`` is 0 for a finite entry and NaN for inf or NaN, so adding the sum of it is exact
    for finite values and poisons otherwise: three small kernels, where an ``isfinite`` test
    and a ``where`` take six.
    """
    zero = sum((v.detach() * 0).sum() for v in values)
    return result + zero.to(result.dtype)


def leaves(params: Params) -> tuple[list[str], TensorList]:
    """Fresh leaf tensors (``requires_grad``) that share storage with ``params``."""
    names = list(params)
    for name in names:
        if not (params[name].is_floating_point() or params[name].is_complex()):
            raise ValueError(
                f"params[{name!r}] is {params[name].dtype}: hypergradients differentiate with "
                "respect to the parameters, which must be floating point (leave integer buffers "
                "out of params)"
            )
    return names, [params[n].detach().requires_grad_(True) for n in names]


def check_outer_value(value: Tensor) -> Tensor:
    """``value`` if it is a scalar tensor, else a ValueError naming ``outer_loss``. A value that
    carries no gradient (it ignores the parameters, was detached, or is built from argmax and
    comparisons) gives a zero hypergradient: that is returned, with a warning (once)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"outer_loss must return a scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"outer_loss must return a scalar, got shape {tuple(value.shape)}")
    if not value.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            "outer_loss carries no gradient back to params (it ignores them, was detached, or "
            "is built from argmax / comparisons): the hypergradient is zero",
            stacklevel=2,
        )
    return value


StepSize = "float | Tensor | Sequence[float | Tensor]"


def per_tensor(step: object) -> bool:
    """Whether a step size is one per tensor (an optimizer whose parameter groups have learning
    rates of their own) rather than one number for all."""
    return isinstance(step, list | tuple)


def scaled(tensors: Sequence[Tensor], step) -> TensorList:
    """``step * t`` for each tensor: one number for all, or one per tensor."""
    if per_tensor(step):
        return [t * s for t, s in zip(tensors, step, strict=True)]
    return torch._foreach_mul(list(tensors), step)


def tree_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Sum of elementwise products over a list of tensors (a scalar tensor, no host sync)."""
    return torch.stack(
        [torch.vdot(x.flatten(), y.flatten()) for x, y in zip(a, b, strict=True)]
    ).sum()


def grad_outer(
    outer_loss: OuterLoss, names: list[str], theta: TensorList, reduce: Reduce | None = None
) -> TensorList:
    """Gradient of the outer loss at ``theta`` (zeros for parameters it does not use)."""
    value = check_outer_value(outer_loss(dict(zip(names, theta, strict=True))))
    return (reduce or _identity)(grad_of_outer_value(value, theta))


def grads_or_zeros(value: Tensor, inputs: Sequence[Tensor]) -> TensorList:
    """d value / d inputs, zeros for inputs it does not use, and all zeros when ``value`` does
    not depend on any of them (a meta loss that ignores the model: autograd would raise)."""
    if not value.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return list(torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True))


def grad_of_outer_value(value: Tensor, theta: Sequence[Tensor]) -> TensorList:
    """d value / d theta (zeros for tensors it does not use), marked NaN if ``value`` is not
    finite: every solver's K-vector sums over all entries of this gradient, so marking one
    (small) tensor is enough to make the result non-finite when the meta loss was."""
    grads = grads_or_zeros(value, theta)
    i = min(range(len(grads)), key=lambda j: grads[j].numel())
    grads[i] = poison_nonfinite(grads[i], value.detach())
    return grads


_FORWARD_AD_READY = False


def _load_forward_ad_quietly() -> None:
    """torch loads its forward-mode decompositions at the first ``make_dual`` of a process and
    scripts them with ``torch.jit.script``, which warns that it is deprecated (torch 2.13): a
    warning the caller cannot act on, and an error in test suites that turn warnings into
    errors. Load them once here with that one warning silenced."""
    global _FORWARD_AD_READY
    if not _FORWARD_AD_READY:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script.*", category=DeprecationWarning
            )
            with fwAD.dual_level():
                fwAD.make_dual(torch.zeros(1), torch.zeros(1))
        _FORWARD_AD_READY = True


def domain_jvp(
    per_domain_loss: PerDomainLoss,
    names: list[str],
    theta: TensorList,
    v: TensorList,
    k: int,
    reduce: Reduce | None = None,
) -> Tensor:
    """J_L v = [<grad L_k(theta), v>]_k ``[K]`` by one forward-mode pass (dual tensors).

    Falls back to reverse-over-reverse when an operation of the model has no forward-mode
    derivative.
    """
    _load_forward_ad_quietly()
    try:
        with fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(t.detach(), vi.detach()) for n, t, vi in zip(names, theta, v)
            }
            losses = check_per_domain_shape(per_domain_loss(duals), k)
            tangent = fwAD.unpack_dual(losses).tangent
    except NotImplementedError:
        w = torch.ones(k, dtype=theta[0].dtype, device=theta[0].device)
        return InnerProducts.at(per_domain_loss, names, theta, w, reduce).domain_jvp(v)
    primal = fwAD.unpack_dual(losses).primal
    if tangent is None:  # no operation on the way from params to the losses was differentiable
        raise no_gradient_error()
    return (reduce or _identity)([poison_nonfinite(tangent, primal)])[0]


class InnerProducts:
    """grad_theta F(theta, w), kept with its graph, for H u and J_L v products.

    Build it with :meth:`at` (a fresh forward/backward at ``theta``), or directly from the graph
    of a gradient that was computed anyway, e.g. the trainer's last inner step.

    Args:
        grad: grad_theta F(theta, w) computed with ``create_graph=True`` (one per parameter).
        theta: the leaf tensors the gradient was taken with respect to.
        w: the weight-VALUES leaf ``[K]`` that F was built from (``requires_grad``).
        losses: the per-domain losses ``[K]`` at theta (for the non-finite check).
        reduce: averages each product across data-parallel ranks (H and J_L are means over
            the global batch, so the local products are averaged).
    """

    def __init__(
        self,
        grad: Sequence[Tensor],
        theta: Sequence[Tensor],
        w: Tensor,
        losses: Tensor,
        reduce: Reduce | None = None,
    ) -> None:
        self.grad, self.theta, self.w = list(grad), list(theta), w
        self.losses = losses.detach()
        self.reduce = reduce or _identity
        # Only gradients that depend on theta or w carry a graph; the rest are constant zeros.
        self._live = [i for i, g in enumerate(self.grad) if g.requires_grad]

    @classmethod
    def at(
        cls,
        per_domain_loss: PerDomainLoss,
        names: list[str],
        theta: TensorList,
        w: Tensor,
        reduce: Reduce | None = None,
    ) -> InnerProducts:
        """Products at ``theta`` (leaves) for weight values ``w`` (taken as fixed)."""
        losses = per_domain_loss(dict(zip(names, theta, strict=True)))
        check_per_domain_shape(losses, w.numel(), differentiable=True)
        w_leaf = w.detach().to(losses.dtype).requires_grad_(True)
        grads = torch.autograd.grad(
            torch.dot(w_leaf, losses),
            theta,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return cls(grads, theta, w_leaf, losses, reduce)

    def _backward(self, v: Sequence[Tensor], inputs: Sequence[Tensor]) -> TensorList:
        """This rank's vector-Jacobian product of grad_theta F with ``v`` (not yet reduced)."""
        outs = [self.grad[i] for i in self._live]
        cots = [v[i] for i in self._live]
        if not outs:
            return [torch.zeros_like(x) for x in inputs]
        grads = torch.autograd.grad(
            outs, list(inputs), cots, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        return list(grads)

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """<a, b> over parameter-shaped lists (replicated on every rank: no reduction)."""
        return tree_dot(a, b)

    def hvp(self, u: Sequence[Tensor]) -> TensorList:
        """H u with H = d^2 F / d theta^2 at (theta, w)."""
        return self.reduce(self._backward(u, self.theta))

    def domain_jvp(self, v: Sequence[Tensor]) -> Tensor:
        """[<grad_theta L_k, v>]_k, shape ``[K]``: one product whatever K is."""
        local = poison_nonfinite(self._backward(v, [self.w])[0], self.losses)
        return self.reduce([local])[0]

    def hvp_jvp(self, u: Sequence[Tensor]) -> tuple[TensorList, Tensor]:
        """(H u, J_L u) from ONE backward pass over the kept graph: the gradient of
        <grad_theta F, u> with respect to theta is H u, with respect to w it is J_L u. Solvers
        that need J_L of a sum of directions (CG) accumulate it from these by-products."""
        *hu, jl = self._backward(u, [*self.theta, self.w])
        jl = poison_nonfinite(jl, self.losses)
        out = self.reduce([*hu, jl])
        return list(out[:-1]), out[-1]
