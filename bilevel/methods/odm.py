"""ODM: online data mixing as a multi-armed bandit (no meta set, no hypergradient).

Albalak et al., 2023, "Efficient Online Data Mixing For Language Model Pre-Training". Each domain
is an arm of an EXP3 bandit whose reward is the training loss on that domain: domains the model
still finds hard are sampled more. With K domains, step t, and
eps_t = min(1/K, sqrt(ln K / (K t))), the sampling policy is

    pi_t = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t,

and after each step the reward estimate of every domain moves towards its importance-weighted
loss, R_k <- a R_k + (1 - a) x_k, where x_k = (sum of domain k's losses in the batch) / (b pi_k)
is an unbiased estimate of its mean loss whether or not the batch held a row of it (the batched
form of EXP3's L / pi_k for the pulled arm).

Batches are drawn from pi itself (systematic sampling) and trained on with the plain batch
mean, so ``trainer.sampling`` does not apply. The policy is the domain weights: it is logged,
checkpointed and, when the window ends, written into the weights (``trainer.outer_every=1``
updates it every step, as in the paper). Cost: nothing beyond training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.errors import ConfigError, is_finite_number
from bilevel.functional import segment_mean
from bilevel.methods.base import OuterUpdate

__all__ = ["ODM"]


@dataclass
class ODM:
    """EXP3 over domains with the training loss as reward (see the module doc).

    Args:
        smoothing: a, the moving-average factor of the reward estimates.
    """

    smoothing: float = 0.9
    name: str = "odm"
    _state: dict = field(default_factory=dict, repr=False, compare=False)

    uses_meta = False
    uses_outer_optimizer = False  # sets the weights by its own rule

    def __post_init__(self) -> None:
        if not (is_finite_number(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"odm: smoothing must lie in [0, 1), got {self.smoothing!r}")

    def setup(self, loop) -> list[str]:
        if loop.weights.parametrization != "softmax":
            raise ConfigError(
                "weights.parametrization",
                "odm's policy is a distribution over domains: use weights.parametrization=softmax",
            )
        k = loop.k
        self._state.update(rewards=torch.zeros(k, device=loop.device, dtype=torch.float64), t=0)
        notes = []
        if loop.config.sampling != "uniform":
            notes.append(
                f"odm samples batches from its own policy: trainer.sampling="
                f"{loop.config.sampling} is not used"
            )
        return notes

    def eps(self, t: int, k: int) -> float:
        return min(1.0 / k, math.sqrt(math.log(k) / (k * max(t, 1)))) if k > 1 else 0.0

    def policy(self, k: int, t: int) -> torch.Tensor:
        rewards = self._state["rewards"]
        eps_now, eps_before = self.eps(t, k), self.eps(t - 1, k)
        return (1 - k * eps_now) * torch.softmax(eps_before * rewards, 0) + eps_now

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        k = loop.k
        pi = loop.w.to(torch.float64) / loop.w.sum()
        sampler = loop.train_sampler
        for _ in range(n):
            batch = sampler.draw(pi)
            loop.inner_step(batch, mean=True)
            per_example = loop.last_per_example
            sums = segment_mean(
                per_example.to(torch.float64),
                batch["domain"],
                k,
                torch.ones(k, dtype=torch.float64, device=pi.device),
            )
            # each rank's estimate from its own batch, averaged over ranks: every rank keeps
            # the same rewards and so the same policy (they drifted apart under torchrun)
            (estimate,) = loop.strategy.reduce([sums / (sampler.batch_size * pi)])
            rewards = self._state["rewards"]
            self._state["rewards"] = self.smoothing * rewards + (1 - self.smoothing) * estimate
            self._state["t"] += 1
        if not update:
            return None
        new = self.policy(k, self._state["t"])
        return OuterUpdate(values=new.to(loop.w.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": self._state["rewards"].clone(), "t": self._state["t"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state["rewards"] = state["rewards"].to(self._state["rewards"].device)
        self._state["t"] = int(state["t"])
