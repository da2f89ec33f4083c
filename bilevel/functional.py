"""Pure helpers that turn a module, a batch and a loss into the functions the solvers need.

A *per-domain loss* is ``params -> Tensor[K]`` (mean inner loss of each domain), an *outer loss*
is ``params -> scalar``; ``params`` is a ``dict[str, Tensor]`` of the trainable parameters.
Per-domain means are one segment reduction (``index_add``) over the per-example losses, so a
batch that mixes all K domains costs one forward pass whatever K is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Batch",
    "PerDomainLoss",
    "OuterLoss",
    "Reduce",
    "segment_mean",
    "forward_batch",
    "trainable_params",
    "make_per_domain_loss",
    "make_per_example_loss",
    "make_outer_loss",
    "mean_over_ranks",
    "model_scores",
    "check_per_domain_shape",
    "no_gradient_error",
]

Batch = Mapping[str, Any]
Params = dict[str, Tensor]
PerDomainLoss = Callable[[Params], Tensor]
OuterLoss = Callable[[Params], Tensor]
TensorList = list[Tensor]
Reduce = Callable[[TensorList], TensorList]
"""Averages a list of tensors across data-parallel ranks in place (identity on one process)."""


def segment_mean(
    values: Tensor, index: Tensor, num_segments: int, inverse_counts: Tensor | None = None
) -> Tensor:
    """Mean of ``values`` ``[B]`` within each segment ``index`` ``[B]`` (int64) -> ``[K]``.

    A segment with no example gets 0 (not NaN), so a batch that misses a domain contributes
    nothing for it. No Python loop over segments and no host synchronization.
    ``inverse_counts`` ``[K]`` (1/count, 0 for empty segments) skips counting when the caller
    already knows how many examples of each segment the batch holds.
    """
    if values.dim() != 1 or index.shape != values.shape:
        raise ValueError(
            f"segment_mean needs values [B] and index [B]; got {tuple(values.shape)} and "
            f"{tuple(index.shape)} (an inner loss must return one value per example)"
        )
    if fwAD.unpack_dual(values).tangent is not None:
        # forward-mode AD (first_order's J_L v): index_add and elementwise products of dual
        # tensors take slow paths; one matrix-vector product does not
        matrix = averaging_matrix(index, num_segments, inverse_counts, values.dtype)
        return matrix.mv(values)
    sums = values.new_zeros(num_segments).index_add(0, index, values)
    if inverse_counts is not None:
        return sums * inverse_counts.to(sums.dtype)
    counts = values.new_zeros(num_segments).index_add(0, index, torch.ones_like(values))
    return sums / counts.clamp_min(1)


def mean_over_ranks(tensors: TensorList) -> TensorList:
    """Each tensor averaged over the processes of ``torch.distributed``'s default group (one
    coalesced all-reduce; the identity without one): the ``reduce`` that
    :func:`bilevel.hypergradient` takes in a data-parallel loop of one's own (DDP, accelerate),
    so that every rank gets the same hypergradient."""
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return tensors
    world = dist.get_world_size()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def forward_batch(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on ``batch["x"]``: keyword arguments if it is a mapping, else positional."""
    x = batch["x"]
    return model(**x) if isinstance(x, Mapping) else model(x)


def model_scores(output: Any) -> Any:
    """The tensor a loss or a metric reads from a model's output: the output itself, its
    ``logits`` (a Hugging Face ``ModelOutput`` or a dict), or the first element of a tuple;
    anything else is returned as it is (for the caller's message)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


def trainable_params(model: nn.Module) -> Params:
    """Detached views of the parameters with ``requires_grad``, by qualified name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class _Swapper:
    """Puts tensors in place of a module's parameters for one call, then puts the originals back.

    ``torch.func.functional_call`` does the same with checks that cost more than the forward
    pass of a small model, and (torch 2.13, pytorch/pytorch#164759) leaves plain tensors in
    place of the parameters of a submodule registered under two names (``self.shared =
    self.encoder.embed``, as T5 and BART do), so that the optimizer's parameters no longer
    reach the model. This splits each name into its submodule path and attribute once and
    swaps dictionary entries (the submodule is looked up on every call, so replacing a
    submodule later is safe). Tied weights (one parameter under several names, a module
    registered twice) are swapped in every place the model holds them, so the call sees one
    tensor there as the model sees one parameter. Modules with parametrizations keep using
    ``functional_call``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.usable = not any(hasattr(m, "parametrizations") for m in model.modules())
        self.canonical: dict[str, str] = {}  # any name of a parameter -> its first name
        self.slots: dict[str, list[tuple[str, str]]] = {}  # first name -> (owner, attribute)s
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            canonical = self.canonical[name] = first.setdefault(id(p), name)
            self.slots.setdefault(canonical, []).append((owner, attr))

    def __call__(self, model: nn.Module, params: Params, args: tuple, kwargs: dict) -> Any:
        if not self.usable or not params.keys() <= self.canonical.keys():
            return functional_call(model, params, args, kwargs, strict=False)
        saved = []
        given: dict[str, str] = {}
        try:
            for name, tensor in params.items():
                canonical = self.canonical[name]
                other = given.setdefault(canonical, name)
                if other != name:
                    if params[other] is tensor:
                        continue
                    raise ValueError(
                        f"params hold {other!r} and {name!r}, two names of one tied parameter "
                        "of the model, with different tensors: pass it once"
                    )
                for owner, attr in self.slots[canonical]:
                    store = model.get_submodule(owner)._parameters
                    saved.append((store, attr, store[attr]))
                    store[attr] = tensor
            return model(*args, **kwargs)
        finally:
            # newest first: a module registered twice holds one store, saved twice
            for store, attr, original in reversed(saved):
                store[attr] = original


def _call(model: nn.Module, params: Params, batch: Batch) -> Any:
    swapper = model.__dict__.get("_bilevel_swapper")
    if swapper is None:
        swapper = model.__dict__["_bilevel_swapper"] = _Swapper(model)
    x = batch["x"]
    if isinstance(x, Mapping):
        return swapper(model, params, (), dict(x))
    return swapper(model, params, (x,), {})


def check_per_domain_shape(
    losses: Tensor, num_domains: int, differentiable: bool = False
) -> Tensor:
    """Raise unless ``losses`` is shaped ``[K]`` (and, with ``differentiable``, carries a
    gradient back to the parameters it was computed from); returns it unchanged."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"per_domain_loss must return a Tensor [K] (one mean loss per domain), got "
            f"{type(losses).__name__}"
        )
    if not (losses.is_floating_point() or losses.is_complex()):
        raise TypeError(
            f"per_domain_loss returned {str(losses.dtype).removeprefix('torch.')}: the "
            "per-domain losses must be floating point (differentiable in params)"
        )
    if losses.shape != (num_domains,):
        raise ValueError(
            f"per_domain_loss returned shape {tuple(losses.shape)}, expected ({num_domains},): "
            f"one mean loss per domain for K={num_domains} domains"
        )
    if differentiable and not losses.requires_grad:
        raise no_gradient_error()
    return losses


def no_gradient_error() -> ValueError:
    """The error for a per-domain loss that does not depend differentiably on the parameters:
    every hypergradient would be exactly zero, for a reason the caller should know."""
    return ValueError(
        "per_domain_loss carries no gradient back to params (it ignores them, was detached, or "
        "is built from argmax / comparisons): every hypergradient would be zero"
    )


def make_per_domain_loss(
    model: nn.Module,
    batch: Batch,
    loss_fn: Callable[[Any, Batch], Tensor],
    num_domains: int,
    inverse_counts: Tensor | None = None,
) -> PerDomainLoss:
    """``params -> Tensor[K]``: mean of ``loss_fn(model(x), batch)`` ``[B]`` per domain.

    ``params`` may hold only a subset of the parameters (e.g. LoRA or a head): the others are
    read from ``model``. ``inverse_counts``: see :func:`segment_mean`.
    """
    domain = batch["domain"]
    averaging: dict[torch.dtype, Tensor] = {}

    def per_domain_loss(params: Params) -> Tensor:
        per_example = loss_fn(_call(model, params, batch), batch)
        if per_example.dtype in (torch.float16, torch.bfloat16):  # reduce in float32
            per_example = per_example.float()
        if per_example.dim() != 1 or per_example.shape != domain.shape:
            return segment_mean(per_example, domain, num_domains, inverse_counts)  # says why
        # One matrix-vector product with a per-batch [K, B] averaging matrix: the same numbers
        # as segment_mean, and much cheaper under forward-mode AD (first_order's J_L v), where
        # index_add and elementwise products of dual tensors go through slow paths.
        matrix = averaging.get(per_example.dtype)
        if matrix is None:
            matrix = averaging_matrix(domain, num_domains, inverse_counts, per_example.dtype)
            averaging[per_example.dtype] = matrix
        return matrix.mv(per_example)

    return per_domain_loss


def averaging_matrix(
    index: Tensor, num_segments: int, inverse_counts: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """``[K, B]``: row k averages the entries of segment k (what :func:`segment_mean` does)."""
    onehot = torch.nn.functional.one_hot(index, num_segments).to(dtype).T
    if inverse_counts is None:
        inverse = 1.0 / onehot.sum(1).clamp_min(1)
    else:
        inverse = inverse_counts.to(dtype)
    return (onehot * inverse[:, None]).contiguous()


def make_per_example_loss(
    model: nn.Module, batch: Batch, loss_fn: Callable[[Any, Batch], Tensor]
) -> Callable[[Params], Tensor]:
    """``params -> Tensor[B]``: ``loss_fn(model(x), batch)`` per example (half precision is
    upcast to float32)."""

    def per_example_loss(params: Params) -> Tensor:
        out = loss_fn(_call(model, params, batch), batch)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    return per_example_loss


def make_outer_loss(
    model: nn.Module, batch: Batch, loss_fn: Callable[[Any, Batch], Tensor]
) -> OuterLoss:
    """``params -> scalar``: the outer (meta) loss of ``model`` with ``params`` on ``batch``."""

    def outer_loss(params: Params) -> Tensor:
        value = loss_fn(_call(model, params, batch), batch)
        if value.dim() != 0:
            raise ValueError(f"outer loss must return a scalar, got shape {tuple(value.shape)}")
        return value

    return outer_loss
