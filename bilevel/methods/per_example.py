"""Hypergradients for per-example weights (``weights=meta_weight_net``, ``instance_net``,
``instance_table``).

With domain weights the inner objective is sum_k w_k L_k and the solvers need J_L v, the
K-vector [<grad L_k, v>]_k. With a meta-weight net the objective is (1/B) sum_i c_i(phi) l_i,
so the same one-product idea gives the B-vector [<grad l_i, v>]_i / B (one backward over the
kept graph of the last inner step, with the coefficients c as its leaf), the solver returns
dM/dc, and dM/dphi = J_c(phi)^T dM/dc is one vector-Jacobian product through the small net.
Cost per outer step: that of the same solver with domain weights, plus the net's forward and
backward on B losses; the product's result grows from K to B numbers, its cost does not.

Any solver with ``solve`` works (first_order, neumann, cg, sama), with autograd products.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel.errors import ConfigError
from bilevel.methods.base import OuterUpdate
from bilevel.methods.hypergradient import HypergradientMethod

__all__ = ["PerExampleMethod"]


class PerExampleMethod(HypergradientMethod):
    """A hypergradient solver learning a meta-weight net's parameters."""

    uses_meta = True

    def setup(self, loop) -> list[str]:
        solver = self.solver
        if not callable(getattr(solver, "solve", None)):
            raise ConfigError(
                "solver",
                f"per-example weights (weights={loop.weights.parametrization}) are learned with "
                f"first_order, neumann, cg or sama, "
                f"not {self.name!r}",
            )
        if getattr(solver, "products", "autograd") != "autograd" or loop.strategy.sharded:
            raise ConfigError(
                "solver.products",
                f"weights={loop.weights.parametrization} needs autograd products (the "
                "per-example product comes from the last inner step's graph)",
            )
        if loop.applies_weights:
            raise ConfigError(
                "trainer.sampling",
                f"weights={loop.weights.parametrization} weights each example's loss; sampling="
                f"{loop.config.sampling} would apply domain weights through the sampler as "
                "well: use trainer.sampling=uniform or size",
            )
        notes = super().setup(loop)
        self.path = "graph"
        if loop.train_sampler.batch_size == 1:
            notes.append(
                f"weights={loop.weights.parametrization} with a batch of one row per process: "
                "each example's "
                "weight is normalized by the batch mean (c_i = V_i / mean V), so it is always 1 "
                "and nothing is learned; use trainer.batch_size >= 2"
            )
        return notes

    def _factors(self, loop):
        net = loop.weights

        def factors(per_example, batch):
            with torch.no_grad():
                c = net.example_coefficients(per_example, batch)
            net.record(c, batch["domain"])
            return c

        return factors

    def window(self, loop, n: int, update: bool) -> OuterUpdate | None:
        net = loop.weights
        factors = self._factors(loop)
        for _ in range(n - update):
            loop.inner_step(loop.next_batch(), example_weights=factors, mean=True)
        if not update:
            return None
        batch = loop.next_batch()
        products = loop.inner_step(batch, keep_graph=True, coefficients=factors)
        grad_c = self._solve(loop, products, loop.meta_gradient())
        losses = products.losses  # per-example losses at theta_{T-1}
        with torch.enable_grad():
            c = net.example_coefficients(losses, batch)
            (grad,) = torch.autograd.grad(c, net.logits, grad_c.to(c.dtype))
        return OuterUpdate(grad=grad, wrt_logits=True)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict()
