"""The benchmark's contestants: bilevel's solvers, fixed-weight baselines, higher, TorchOpt, Betty.

Every method solves the same problem (see ``bench.py``): it owns a freshly seeded copy of the
same MLP, draws the same batches from its own ``DomainSampler`` with the same seed, uses the same
inner SGD learning rate, the same outer optimizer (Adam on softmax logits) and the same meta set.
``outer_step()`` runs T inner steps plus (for bilevel methods) one hypergradient and one outer
update. A peer that cannot be imported or built raises ``Unavailable`` with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import (
    BilevelTrainer,
    DomainWeights,
    TrainerConfig,
    hypergradient,
    make_per_domain_loss,
    segment_mean,
)
from bilevel.data import DomainData, DomainSampler
from bilevel.data.columns import to_device
from bilevel.losses import cross_entropy, per_example_cross_entropy
from bilevel.models import MLP
from bilevel.solvers import build


class Unavailable(RuntimeError):
    """This peer cannot run here; the message says why."""


@dataclass
class Problem:
    k: int = 4
    noisy: int = 2
    noise: float = 0.4
    dim: int = 20
    classes: int = 2
    hidden: int = 64
    per_domain: int = 64  # examples of each domain in one inner batch
    unroll: int = 5  # T: inner steps per outer step
    iters: int = 5  # Neumann / CG iterations
    inner_lr: float = 0.1
    outer_lr: float = 0.1
    meta_size: int = 256
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f"d{i}" for i in range(self.k)]

    @property
    def batch_size(self) -> int:
        return self.k * self.per_domain


def make_data(p: Problem) -> DomainData:
    from bilevel.data import noisy_domains

    noise = [0.0] * (p.k - p.noisy) + [p.noise] * p.noisy
    return noisy_domains(
        names=p.names,
        label_noise=noise,
        per_domain=max(4 * p.per_domain, 512),
        meta_size=p.meta_size,
        test_size=2000,
        dim=p.dim,
        num_classes=p.classes,
        seed=p.seed,
    )


def make_model(p: Problem) -> nn.Module:
    torch.manual_seed(p.seed)
    return MLP(p.dim, p.classes, hidden=p.hidden).to(p.device)


class Method:
    """Base: a model, weights, a sampler; subclasses define ``outer_step``."""

    name = "method"

    def __init__(self, p: Problem, data: DomainData) -> None:
        self.p = p
        self.device = torch.device(p.device)
        self.train = to_device(data.train, self.device)
        self.meta = to_device(data.meta, self.device)
        self.model = make_model(p)
        self.weights = DomainWeights(p.names, device=self.device)
        self.sampler = DomainSampler(self.train, p.k, p.batch_size, "uniform", p.seed)
        self.inverse = self.sampler.inverse_counts

    def batch(self) -> dict[str, torch.Tensor]:
        return self.sampler.next()

    def per_domain(self, model: nn.Module, batch: dict) -> torch.Tensor:
        per_example = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
        return segment_mean(per_example, batch["domain"], self.p.k, self.inverse)

    def meta_loss(self, model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(self.meta["x"]), self.meta["y"])

    def outer_step(self) -> None:
        raise NotImplementedError

    def final_model(self) -> nn.Module:
        return self.model

    def final_weights(self) -> dict[str, float]:
        return self.weights.as_dict()


# -- baselines ---------------------------------------------------------------------------------


class FixedPlain(Method):
    """T plain PyTorch SGD steps on the uniformly weighted loss: the reference for overhead."""

    name = "fixed weights, plain PyTorch loop"

    def __init__(self, p, data):
        super().__init__(p, data)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.inner_lr)
        self.w = self.weights.value().detach()

    def outer_step(self):
        for _ in range(self.p.unroll):
            batch = self.batch()
            loss = (self.w * self.per_domain(self.model, batch)).sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


class Ours(Method):
    """bilevel's BilevelTrainer, one window (T inner steps + hypergradient) per outer step."""

    def __init__(self, p, data, solver: str, learn: bool = True, **opts):
        super().__init__(p, data)
        label = solver + (" warm(1)" if opts.get("warm_start") else "")
        label += ", simultaneous" if opts.get("simultaneous") else ""
        self.name = f"bilevel {label}" if learn else "fixed weights, bilevel trainer"
        self.trainer = BilevelTrainer(
            self.model,
            self.weights,
            build(solver, **opts),
            per_example_cross_entropy,
            cross_entropy,
            data,
            TrainerConfig(
                steps=10**9,
                outer_every=p.unroll,
                batch_size=p.batch_size,
                progress=False,
                learn_weights=learn,
            ),
            inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=p.inner_lr, fused=True),
            outer_optimizer=lambda ps: torch.optim.Adam(ps, lr=p.outer_lr, fused=True),
            device=self.device,
            seed=p.seed,
        )

    def outer_step(self):
        self.trainer.step_window()


class OursAPI(Method):
    """A user's own loop around the public ``bilevel.hypergradient``, as the README writes it.

    T plain SGD steps on the weighted loss (``torch.optim.SGD``, fused), then one call of
    ``bilevel.hypergradient`` at the last inner batch (``make_per_domain_loss``) and one Adam
    step on the logits. What the public API costs on top of the trainer's own path.
    """

    def __init__(self, p, data, solver: str, **opts):
        super().__init__(p, data)
        label = solver + (" warm(1)" if opts.get("warm_start") else "")
        self.name = f"bilevel.hypergradient {label} (own loop)"
        self.solver = build(solver, **opts)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.inner_lr, fused=True)
        self.outer = torch.optim.Adam(self.weights.parameters(), lr=p.outer_lr, fused=True)
        self.meta_fn = lambda params: F.cross_entropy(
            torch.func.functional_call(self.model, params, (self.meta["x"],)), self.meta["y"]
        )

    def outer_step(self):
        w = self.weights.value().detach()
        for _ in range(self.p.unroll):
            batch = self.batch()
            loss = torch.dot(w, self.per_domain(self.model, batch))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        per_domain = make_per_domain_loss(
            self.model, batch, per_example_cross_entropy, self.p.k, self.inverse
        )
        params = {n: t.detach() for n, t in self.model.named_parameters()}
        grad = hypergradient(
            self.solver, per_domain, self.meta_fn, params, self.weights, self.p.inner_lr
        )
        self.outer.zero_grad(set_to_none=True)
        self.weights.logits.grad = grad
        self.outer.step()


# -- higher ------------------------------------------------------------------------------------


class HigherUnrolled(Method):
    """higher.innerloop_ctx over the T inner steps, meta loss backward to the logits."""

    name = "higher unrolled"

    def __init__(self, p, data):
        try:
            import higher
        except ImportError as err:
            raise Unavailable(f"higher is not installed ({err})") from err
        super().__init__(p, data)
        self.higher = higher
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.inner_lr)
        self.outer = torch.optim.Adam(self.weights.parameters(), lr=p.outer_lr)

    def outer_step(self):
        self.outer.zero_grad(set_to_none=True)
        with self.higher.innerloop_ctx(self.model, self.opt, copy_initial_weights=True) as (
            fmodel,
            diffopt,
        ):
            w = self.weights.value()
            for _ in range(self.p.unroll):
                diffopt.step((w * self.per_domain(fmodel, self.batch())).sum())
            self.meta_loss(fmodel).backward()
            with torch.no_grad():
                for p_, fp in zip(self.model.parameters(), fmodel.parameters()):
                    p_.copy_(fp)
        self.outer.step()


# -- TorchOpt ----------------------------------------------------------------------------------


def _torchopt():
    try:
        import torchopt
    except ImportError as err:
        raise Unavailable(f"torchopt is not installed ({err})") from err
    return torchopt


class TorchOptUnrolled(Method):
    """torchopt.MetaSGD steps that stay differentiable, then the meta loss backward."""

    name = "TorchOpt unrolled (MetaSGD)"

    def __init__(self, p, data):
        self.torchopt = _torchopt()
        super().__init__(p, data)
        self.inner = self.torchopt.MetaSGD(self.model, lr=p.inner_lr)
        self.outer = torch.optim.Adam(self.weights.parameters(), lr=p.outer_lr)

    def outer_step(self):
        w = self.weights.value()
        for _ in range(self.p.unroll):
            self.inner.step((w * self.per_domain(self.model, self.batch())).sum())
        self.outer.zero_grad(set_to_none=True)
        self.meta_loss(self.model).backward()
        self.outer.step()
        self.torchopt.stop_gradient(self.model)
        self.torchopt.stop_gradient(self.inner)


class TorchOptImplicit(Method):
    """torchopt.nn.ImplicitMetaGradientModule: T SGD steps in ``solve``, implicit gradient by
    TorchOpt's Neumann series (``solve_inv(ns=True)``) or conjugate gradients (``solve_cg``)."""

    def __init__(self, p, data, kind: str):
        torchopt = _torchopt()
        super().__init__(p, data)
        self.name = f"TorchOpt implicit {kind}({p.iters})"
        if kind == "neumann":
            linear_solve = torchopt.linear_solve.solve_inv(
                ns=True, maxiter=p.iters, alpha=p.inner_lr
            )
        else:
            linear_solve = torchopt.linear_solve.solve_cg(maxiter=p.iters)
        method = self

        class Inner(torchopt.nn.ImplicitMetaGradientModule, linear_solve=linear_solve):
            def __init__(self, weights):
                super().__init__()
                self.weights = weights  # a module given to __init__: its parameters are meta
                self.net = make_model(method.p)  # built here: its parameters are inner

            def objective(self, batch):
                return (self.weights.value() * method.per_domain(self.net, batch)).sum()

            def solve(self, batch):
                # the first T-1 batches of this window, then the batch that the optimality
                # condition (the implicit gradient) is evaluated on
                params = tuple(self.net.parameters())
                opt = torch.optim.SGD(params, lr=method.p.inner_lr)
                with torch.enable_grad():
                    for b in [*method.queue, batch]:
                        loss = self.objective(b)
                        opt.zero_grad(set_to_none=True)
                        loss.backward(inputs=params)
                        opt.step()
                return self

        self.torchopt = torchopt
        self.inner = Inner(self.weights)
        self.model = self.inner.net
        self.outer = torch.optim.Adam(self.weights.parameters(), lr=p.outer_lr)
        self.queue: list[dict] = []

    def outer_step(self):
        batches = [self.batch() for _ in range(self.p.unroll)]
        self.queue = batches[:-1]
        self.inner.solve(batches[-1])
        self.outer.zero_grad(set_to_none=True)
        self.meta_loss(self.inner.net).backward()
        self.outer.step()
        # the implicit wrapper left the inner parameters attached to the meta graph
        self.torchopt.stop_gradient(self.inner.net)


# -- Betty -------------------------------------------------------------------------------------


class _Forever:
    def __init__(self, draw):
        self.draw = draw

    def __iter__(self):
        while True:
            yield self.draw()


class Betty(Method):
    """Betty's ImplicitProblem pair (inner MLP, outer weights), Engine stepping T inner steps
    per outer update, hypergradient ``darts`` | ``neumann`` | ``cg``."""

    def __init__(self, p, data, kind: str):
        try:
            from betty.configs import Config, EngineConfig
            from betty.engine import Engine
            from betty.problems import ImplicitProblem
        except ImportError as err:
            raise Unavailable(
                f"betty is not installed ({err}); install betty-ml 0.2.1 with "
                "--ignore-requires-python --no-deps"
            ) from err
        super().__init__(p, data)
        self.name = f"Betty {kind}" + (f"({p.iters})" if kind != "darts" else "")
        method = self

        class Inner(ImplicitProblem):
            def training_step(self, batch):
                return (self.outer() * method.per_domain(self.module, batch)).sum()

        class Outer(ImplicitProblem):
            def training_step(self, batch):
                return F.cross_entropy(self.inner.module(batch["x"]), batch["y"])

        inner_cfg = Config(
            type=kind,
            unroll_steps=p.unroll,
            neumann_iterations=p.iters,
            neumann_alpha=p.inner_lr,
            cg_iterations=p.iters,
            cg_alpha=1.0,
        )
        self.inner = Inner(
            name="inner",
            module=self.model,
            config=inner_cfg,
            optimizer=torch.optim.SGD(self.model.parameters(), lr=p.inner_lr),
            train_data_loader=_Forever(self.batch),
        )
        self.outer = Outer(
            name="outer",
            module=self.weights,
            config=Config(),
            optimizer=torch.optim.Adam(self.weights.parameters(), lr=p.outer_lr),
            train_data_loader=_Forever(lambda: self.meta),
        )
        self.engine = Engine(
            config=EngineConfig(train_iters=10**9, logger_type="none"),
            problems=[self.outer, self.inner],
            dependencies={"u2l": {self.outer: [self.inner]}, "l2u": {self.inner: [self.outer]}},
        )

    def outer_step(self):
        for _ in range(self.p.unroll):
            self.engine.global_step += 1
            self.engine.train_step()


def registry(p: Problem) -> dict[str, Any]:
    """name -> factory(problem, data) of every method, in report order."""
    it = p.iters
    return {
        "fixed_plain": FixedPlain,
        "fixed_ours": lambda p, d: Ours(p, d, "first_order", learn=False),
        "ours_first_order": lambda p, d: Ours(p, d, "first_order"),
        "ours_unrolled": lambda p, d: Ours(p, d, "unrolled", steps=p.unroll),
        "ours_neumann": lambda p, d: Ours(p, d, "neumann", iters=it, alpha=p.inner_lr),
        "ours_cg": lambda p, d: Ours(p, d, "cg", iters=it),
        "ours_cg_warm": lambda p, d: Ours(p, d, "cg", iters=1, warm_start=True),
        "ours_neumann_warm": lambda p, d: Ours(
            p, d, "neumann", iters=1, alpha=p.inner_lr, warm_start=True
        ),
        "ours_neumann_simultaneous": lambda p, d: Ours(
            p, d, "neumann", iters=1, alpha=p.inner_lr, warm_start=True, simultaneous=True
        ),
        "ours_sama": lambda p, d: Ours(p, d, "sama"),
        "api_first_order": lambda p, d: OursAPI(p, d, "first_order"),
        "api_neumann": lambda p, d: OursAPI(p, d, "neumann", iters=it, alpha=p.inner_lr),
        "api_neumann_warm": lambda p, d: OursAPI(
            p, d, "neumann", iters=1, alpha=p.inner_lr, warm_start=True
        ),
        "higher_unrolled": HigherUnrolled,
        "torchopt_unrolled": TorchOptUnrolled,
        "torchopt_neumann": lambda p, d: TorchOptImplicit(p, d, "neumann"),
        "torchopt_cg": lambda p, d: TorchOptImplicit(p, d, "cg"),
        "betty_darts": lambda p, d: Betty(p, d, "darts"),
        "betty_neumann": lambda p, d: Betty(p, d, "neumann"),
        "betty_cg": lambda p, d: Betty(p, d, "cg"),
    }


def copy_problem(p: Problem, **changes) -> Problem:
    q = copy.deepcopy(p)
    for k, v in changes.items():
        setattr(q, k, v)
    return q
