"""Regressions from a mixture (K shares summing to 1) to a target metric.

* ``linear``: least squares on the shares (ridge with a tiny penalty; the shares sum to 1, so
  they carry the intercept themselves). Needs nothing but numpy.
* ``law``: the data mixing law of Ye et al. (2024), L(r) = c + k exp(sum_j t_j r_j): a loss
  that falls off exponentially as beneficial shares grow; fitted by L-BFGS in float64 from a few
  starts (torch).
* ``lightgbm``: gradient-boosted trees (LightGBM), as RegMix fits its proxy runs: no form
  assumed, the best ranker once there are a few hundred runs; optional (``pip install -e
  '.[mixtures]'``).

Each regressor is ``fit(X, y)``, ``predict(X)``, and ``to_json()`` / ``from_json(d)`` for the
saved fit: plain JSON numbers, and LightGBM's own text model as a string (nothing is
unpickled on load).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bilevel.errors import ConfigError

__all__ = ["MODELS", "Linear", "LightGBM", "MixingLaw", "make"]


class Linear:
    name = "linear"

    def __init__(self, ridge: float = 1e-6) -> None:
        self.ridge = ridge
        self.coef: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> Linear:
        k = x.shape[1]
        gram = x.T @ x
        penalty = self.ridge * max(float(np.trace(gram)) / k, 1e-12)
        self.coef = np.linalg.solve(gram + penalty * np.eye(k), x.T @ y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef

    def to_json(self) -> dict[str, Any]:
        return {"coef": [float(v) for v in self.coef]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Linear:
        out = cls()
        out.coef = np.asarray(data["coef"], dtype=float)
        return out


class MixingLaw:
    """L(r) = c + k exp(t . r), fitted on the standardized target."""

    name = "law"

    def __init__(self, starts: int = 4, iterations: int = 300) -> None:
        self.starts, self.iterations = starts, iterations
        self.c = self.k = 0.0
        self.t: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> MixingLaw:
        import torch

        mean, scale = float(y.mean()), float(y.std()) or 1.0
        xs = torch.as_tensor(x, dtype=torch.float64)
        ys = torch.as_tensor((y - mean) / scale, dtype=torch.float64)
        best = (math.inf, None)
        low = float(ys.min())

        def squared_error(c: torch.Tensor, log_k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return ((c + log_k.exp() * torch.exp(xs @ t) - ys) ** 2).mean()

        for start in range(self.starts):
            # c below the smallest loss by 0.5 .. 2 standard deviations; k > 0 through its log
            c = torch.tensor(low - 0.5 * (start + 1), dtype=torch.float64, requires_grad=True)
            log_k = torch.tensor(
                math.log(max(float(ys.mean()) - float(c.detach()), 1e-3)),
                dtype=torch.float64,
                requires_grad=True,
            )
            t = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS(
                [c, log_k, t], max_iter=self.iterations, line_search_fn="strong_wolfe"
            )

            def closure(c=c, log_k=log_k, t=t, opt=opt):
                opt.zero_grad()
                loss = squared_error(c, log_k, t)
                loss.backward()
                return loss

            opt.step(closure)
            # LBFGS.step returns the loss it started from: the fit is judged where it ended
            # (a start whose iterations ran off to nan must not be kept)
            with torch.no_grad():
                loss = float(squared_error(c, log_k, t))
            if math.isfinite(loss) and loss < best[0]:
                best = (loss, (c.item(), log_k.item(), t.detach().numpy().copy()))
        if best[1] is None:
            raise ConfigError("--model", "law: the fit did not converge (non-finite loss)")
        c, log_k, t = best[1]
        # back to the target's units: L = mean + scale (c + e^log_k e^{t.r})
        self.c = mean + scale * c
        self.k = scale * math.exp(log_k)
        self.t = t
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        # k e^{t.r} as one exponential: a fit with a tiny k and a large t (a step-like loss)
        # would otherwise give 0 * inf = nan where e^{t.r} overflows
        if self.k <= 0:
            return np.full(len(x), self.c)
        return self.c + np.exp(math.log(self.k) + x @ self.t)

    def to_json(self) -> dict[str, Any]:
        return {"c": self.c, "k": self.k, "t": [float(v) for v in self.t]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MixingLaw:
        out = cls()
        out.c, out.k, out.t = float(data["c"]), float(data["k"]), np.asarray(data["t"], float)
        return out


def _lightgbm():
    try:
        import lightgbm
    except ImportError:
        raise ConfigError(
            "--model",
            "lightgbm needs the lightgbm package: pip install -e '.[mixtures]' (or use "
            "--model linear or law)",
        ) from None
    return lightgbm


class LightGBM:
    """Boosted regression trees. With few runs the leaves are kept small (at least 3 runs
    a leaf, a tenth of them for larger tables) so that the trees split at all."""

    name = "lightgbm"

    def __init__(self, rounds: int = 1000, learning_rate: float = 0.01, seed: int = 0) -> None:
        self.rounds, self.learning_rate, self.seed = rounds, learning_rate, seed
        self.booster = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> LightGBM:
        lgb = _lightgbm()
        params = {
            "objective": "regression",
            "learning_rate": self.learning_rate,
            "num_leaves": 31,
            "min_data_in_leaf": int(min(20, max(3, len(y) // 10))),
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": 1,
            "verbosity": -1,
        }
        self.booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=self.rounds)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x), dtype=float)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.booster.model_to_string()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LightGBM:
        lgb = _lightgbm()
        out = cls()
        out.booster = lgb.Booster(model_str=data["model"])
        return out


MODELS = {m.name: m for m in (Linear, MixingLaw, LightGBM)}


def make(name: str, seed: int = 0) -> Any:
    """A fresh regressor by name."""
    if name not in MODELS:
        raise ConfigError("--model", f"must be one of {', '.join(MODELS)}, got {name!r}")
    if name == "lightgbm":
        _lightgbm()  # say it is missing before any fitting
        return LightGBM(seed=seed)
    return MODELS[name]()
