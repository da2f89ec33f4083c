"""``noisy_domains``: synthetic classification with label noise that differs by domain.

Every domain draws inputs from the same distribution and labels them with the same random
teacher network; domain k then flips a fraction ``label_noise[k]`` of its labels to another class.
The meta and test sets are clean. A good weighting therefore down-weights exactly the domains
with noise, whatever their names or positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bilevel.data.checks import check_counts, check_list, check_names, check_seed
from bilevel.data.columns import domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import classification_metrics
from bilevel.errors import ConfigError, is_finite_number

__all__ = ["noisy_domains", "flip_labels"]


def flip_labels(
    y: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    """Replace a ``rate`` fraction of labels by a uniformly drawn *different* class."""
    flip = torch.rand(y.shape, generator=gen) < rate
    shift = torch.randint(1, num_classes, y.shape, generator=gen)
    return torch.where(flip, (y + shift) % num_classes, y)


def _teacher(dim: int, num_classes: int, gen: torch.Generator):
    w1 = torch.randn(dim, 4 * dim, generator=gen) / dim**0.5
    w2 = torch.randn(4 * dim, num_classes, generator=gen) / (4 * dim) ** 0.5

    def label(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w1) @ w2).argmax(-1)

    return label


def noisy_domains(
    names: Sequence[str] = ("d0", "d1", "d2", "d3"),
    label_noise: Sequence[float] = (0.0, 0.0, 0.4, 0.4),
    per_domain: int = 500,
    meta_size: int = 200,
    test_size: int = 4000,
    dim: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    val_size: int = 0,
) -> DomainData:
    """Build the data (see module doc). Raises :class:`ConfigError` naming the bad field."""
    names = check_names("names", names, "[d0,d1,d2,d3]")
    noise = check_list("label_noise", label_noise, "[0.0,0.0,0.4,0.4]")
    if not all(is_finite_number(r) for r in noise):
        raise ConfigError("data.label_noise", f"rates must be numbers in [0, 1), got {noise}")
    noise = [float(r) for r in noise]
    if len(noise) != len(names):
        raise ConfigError(
            "data.label_noise",
            f"has {len(noise)} rates but there are {len(names)} domains {names}; "
            "give one label-flip rate per domain",
        )
    bad = [r for r in noise if not 0.0 <= r < 1.0]
    if bad:
        raise ConfigError("data.label_noise", f"rates must lie in [0, 1), got {bad}")
    check_counts(
        per_domain=(per_domain, 1),
        meta_size=(meta_size, 1),
        test_size=(test_size, 1),
        dim=(dim, 1),
        num_classes=(num_classes, 2),
        val_size=(val_size, 0),
    )
    gen = torch.Generator().manual_seed(check_seed(seed))
    label = _teacher(dim, num_classes, gen)

    def sample(n: int):
        x = torch.randn(n, dim, generator=gen)
        return x, label(x)

    parts = []
    for rate in noise:
        x, y = sample(per_domain)
        parts.append({"x": x, "y": flip_labels(y, rate, num_classes, gen)})
    xm, ym = sample(meta_size)
    xt, yt = sample(test_size)
    val = None
    if val_size:  # drawn last: the other sets are the same with or without it
        xv, yv = sample(val_size)
        val = {"x": xv, "y": yv}
    return DomainData(
        names=names,
        train=domain_columns(parts),
        meta={"x": xm, "y": ym},
        test={"x": xt, "y": yt},
        evaluate=classification_metrics,
        model_kwargs={"in_dim": dim, "out_dim": num_classes},
        info={"label_noise": dict(zip(names, noise))},
        val=val,
    )
