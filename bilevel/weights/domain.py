"""Domain weights: K named weights w = p(lambda) with trainable logits lambda.

The logits live on the model's device as one ``nn.Parameter`` of shape ``[K]``; every outer
optimizer (a torch optimizer or :class:`bilevel.outer.MirrorDescent`) updates them. A
parametrization ``p`` maps logits to the weight values that multiply the per-domain losses:

=============  ==================================  ===================  =================
name           w = p(lambda)                       range                default value
=============  ==================================  ===================  =================
``softmax``    softmax(lambda)                     simplex (sum 1)      1/K
``exp``        exp(lambda)                         positive             1
``sigmoid``    sigmoid(lambda)                     (0, 1)               0.5
``softplus``   softplus(lambda) / mean(softplus)   positive, mean 1     1
=============  ==================================  ===================  =================

``softplus`` is the normalisation used by DreamPRM's reference code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DomainWeights",
    "PARAMETRIZATIONS",
    "apply_parametrization",
    "parametrization_vjp",
]


def _softplus_normalized(logits: Tensor) -> Tensor:
    sp = F.softplus(logits)
    return sp / sp.mean()


PARAMETRIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda lam: torch.softmax(lam, dim=0),
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
    "softplus": _softplus_normalized,
}


def apply_parametrization(name: str, logits: Tensor) -> Tensor:
    """Weight values ``p(logits)`` for parametrization ``name`` (differentiable, shape kept)."""
    try:
        fn = PARAMETRIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parametrization {name!r}; valid: {', '.join(sorted(PARAMETRIZATIONS))}"
        ) from None
    return fn(logits)


def parametrization_vjp(name: str, logits: Tensor, grad_values: Tensor) -> Tensor:
    """J_p(logits)^T grad_values: dM/dlogits from dM/dw ``[K]``.

    Closed forms for softmax, exp and sigmoid (a few elementwise ops, no autograd graph);
    autograd for the rest.
    """
    logits = logits.detach()
    g = grad_values.to(logits.dtype)
    if name == "softmax":
        w = torch.softmax(logits, dim=0)
        return w * (g - torch.dot(w, g))
    if name == "exp":
        return torch.exp(logits) * g
    if name == "sigmoid":
        w = torch.sigmoid(logits)
        return w * (1 - w) * g
    with torch.enable_grad():
        leaf = logits.requires_grad_(True)
        (grad,) = torch.autograd.grad(apply_parametrization(name, leaf), leaf, g)
    return grad


def _default_values(parametrization: str, k: int) -> list[float]:
    return {"softmax": [1.0 / k] * k, "sigmoid": [0.5] * k}.get(parametrization, [1.0] * k)


def _logits_from_values(parametrization: str, values: Tensor) -> Tensor:
    """Inverse of the parametrization (up to the invariances of softmax and softplus)."""
    if parametrization == "softmax":
        values = values / values.sum()
        logits = values.log()
        return logits - logits.mean()
    if parametrization == "exp":
        return values.log()
    if parametrization == "sigmoid":
        return torch.logit(values)
    # softplus: the value is softplus(l)/mean(softplus(l)); inverting softplus on values/mean
    # reproduces values/mean(values), i.e. the given values once they have mean 1.
    v = values / values.mean()
    return v + torch.log(-torch.expm1(-v))


def domain_names(names: Sequence[str], owner: str) -> list[str]:
    """``names`` as a list of distinct strings, or a TypeError / ValueError saying what is
    wrong (``owner``: the class that needs them, for the message)."""
    if isinstance(names, str | bytes):  # "abc" would be three domains a, b, c
        raise TypeError(f"names must be a list of domain names, got the string {names!r}")
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{owner} needs at least one domain name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate domain names: {dupes}; each domain needs a unique name")
    return names


def values_by_name(values: Mapping[str, float], names: Sequence[str]) -> list[float]:
    """``{name: value}`` as a list in the order of ``names``; every name needs a value and no
    other name may appear (a misspelt one would otherwise be dropped silently)."""
    unknown = [str(n) for n in values if n not in names]
    missing = [n for n in names if n not in values]
    if unknown or missing:
        said = []
        if unknown:
            said.append(f"names no domain {unknown}")
        if missing:
            said.append(f"gives no value for {missing}")
        raise ValueError(f"init {' and '.join(said)}: the domains are {list(names)}")
    return [values[n] for n in names]


class DomainWeights(nn.Module):
    """K named domain weights ``w = p(logits)`` whose logits are learned by the outer loop.

    Args:
        names: domain names, one per domain, unique; their order is the index order of every
            per-domain loss vector ``[K]`` and of ``batch["domain"]``.
        parametrization: ``"softmax"`` | ``"exp"`` | ``"sigmoid"`` | ``"softplus"``.
        init: initial weight VALUES (not logits): K numbers in the order of ``names``, or
            ``{name: value}`` for every name. Defaults to uniform (1/K for softmax,
            1 for exp and softplus, 0.5 for sigmoid). Softmax values are normalised to sum 1 and
            softplus values to mean 1, since those are the only reachable values.
        device: where the logits live (the model's device).
        dtype: dtype of the logits.

    Examples:
        >>> w = DomainWeights(["web", "code"], parametrization="softmax", init=[0.25, 0.75])
        >>> [round(v, 2) for v in w.value().tolist()]
        [0.25, 0.75]
    """

    def __init__(
        self,
        names: Sequence[str],
        parametrization: str = "softmax",
        init: Sequence[float] | Mapping[str, float] | Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        names = domain_names(names, type(self).__name__)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {parametrization!r}; "
                f"valid: {', '.join(sorted(PARAMETRIZATIONS))}"
            )
        k = len(names)
        if init is None:
            init = _default_values(parametrization, k)
        elif isinstance(init, Mapping):
            init = values_by_name(init, names)
        values = torch.as_tensor(init, dtype=torch.float64).flatten().cpu()
        if values.numel() != k:
            raise ValueError(
                f"init has {values.numel()} values but there are {k} domain names {names}"
            )
        if not torch.isfinite(values).all():
            raise ValueError(f"init values must be finite, got {values.tolist()}")
        if (values <= 0).any():
            raise ValueError(
                f"init values must be > 0 for the {parametrization!r} parametrization, "
                f"got {values.tolist()}"
            )
        if parametrization == "sigmoid" and (values >= 1).any():
            raise ValueError(
                f"init values must lie in (0, 1) for the 'sigmoid' parametrization, "
                f"got {values.tolist()}"
            )
        self.names: list[str] = names
        self.parametrization: str = parametrization
        logits = _logits_from_values(parametrization, values).to(dtype=dtype, device=device)
        self.logits = nn.Parameter(logits)

    def __len__(self) -> int:
        return len(self.names)

    def value(self) -> Tensor:
        """Weight values ``[K]``, differentiable in :attr:`logits`."""
        return apply_parametrization(self.parametrization, self.logits)

    forward = value

    def as_dict(self) -> dict[str, float]:
        """``{name: value}`` as Python floats (synchronizes with the device: for logging only)."""
        return dict(zip(self.names, self.value().detach().cpu().tolist(), strict=True))

    @torch.no_grad()
    def set_values(self, values: Sequence[float] | Tensor) -> None:
        """Set the logits so that :meth:`value` returns ``values`` (same rules as ``init``)."""
        fresh = DomainWeights(self.names, self.parametrization, values, dtype=torch.float64)
        self.logits.copy_(fresh.logits.to(self.logits))

    @torch.no_grad()
    def assign_values_(self, values: Tensor, skip: Tensor | None = None) -> None:
        """Set the logits so that :meth:`value` returns ``values`` ``[K]`` (positive), on the
        device and without a host sync; unchanged where ``skip`` (a 0-d flag) is nonzero.
        For outer methods that set the weights directly (bandits)."""
        fresh = _logits_from_values(self.parametrization, values.detach().to(torch.float64))
        fresh = fresh.to(self.logits.dtype)
        if skip is not None:
            fresh = torch.where(skip.to(torch.bool), self.logits, fresh)
        self.logits.copy_(fresh)

    def extra_repr(self) -> str:
        return f"names={self.names}, parametrization={self.parametrization!r}"
