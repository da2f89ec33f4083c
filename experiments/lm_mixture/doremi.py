"""DoReMi's domain-weight update (Xie et al., 2023), run by bilevel's trainer.

DoReMi trains a small proxy model while it moves the weights by exponentiated gradient towards
the domains where the proxy's loss exceeds a reference model's (trained with uniform weights):

    alpha <- normalize(alpha * exp(eta * max(L_k(proxy) - L_k(reference), 0)))
    w     <- (1 - c) alpha + c / K

It is written here as a "solver" whose output, handed to ``bilevel.MirrorDescent`` (which steps
logits -= eta * g on dM/dw), is g = -max(excess loss, 0); the smoothing c is the mirror-descent
``smoothing``. It never looks at the meta set: that is DoReMi's design (a minimax over domains
against a reference), not a meta-learning objective. The final DoReMi weights are the average of
the weights over the proxy run, used to train a fresh model.

    bilevel-run experiment=lm_mixture solver=doremi solver.reference=<uniform run dir> \\
        trainer/outer_optimizer=mirror_descent trainer.outer_optimizer.smoothing=1e-3 \\
        trainer.outer_every=1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.strategies import checkpoint

__all__ = ["DoReMi"]


@dataclass(frozen=True)
class DoReMi:
    """dM/dw := -max(L_k(params) - L_k(reference), 0) on the current batch."""

    reference: str
    name: str = "doremi"
    #: the update reads the training batch and the reference, not the meta set (a class
    #: attribute, not a field: the trainer asks it whether the outer loss needs a gradient)
    uses_meta = False
    _state: dict = field(default_factory=dict, repr=False, compare=False)

    def check(self, loop) -> None:
        """Before training (the trainer calls this): the reference run must exist, be readable
        and hold every trainable parameter of this model with the same shape."""
        named = dict(loop.module.named_parameters())
        self._load({n: named[n] for n in loop.param_names})

    def _load(self, params: dict[str, Tensor]) -> None:
        if not isinstance(self.reference, str | Path) or not str(self.reference).strip():
            raise ConfigError(
                "solver.reference",
                f"must be the run directory of a uniform-weight run (or its checkpoint file), "
                f"got {self.reference!r}",
            )
        path = Path(self.reference)
        file = path / "checkpoints" / "last.pt" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError("solver.reference", f"no reference checkpoint at {file}")
        try:
            model = checkpoint.load(file).get("model")
        except ConfigError as err:
            raise ConfigError("solver.reference", err.message) from None
        if not isinstance(model, dict):
            raise ConfigError("solver.reference", f"{file} holds no model state")
        for name, tensor in params.items():
            if name not in model or tuple(model[name].shape) != tuple(tensor.shape):
                found = tuple(model[name].shape) if name in model else "nothing"
                raise ConfigError(
                    "solver.reference",
                    f"{file} is a run of another model: parameter {name} "
                    f"{tuple(tensor.shape)} has {found} there",
                )
        self._state["params"] = {n: model[n] for n in params}

    def _reference(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if "params" not in self._state:
            self._load(params)
        ref = self._state["params"]
        return {n: ref[n].to(device=t.device, dtype=t.dtype) for n, t in params.items()}

    @torch.no_grad()
    def domain_grad(self, per_domain_loss, outer_loss, params, w, inner_lr, reduce=None):
        excess = (per_domain_loss(params) - per_domain_loss(self._reference(params))).clamp_min(0)
        if reduce is not None:
            excess = reduce([excess])[0]
        return -excess
