"""``digits``: scikit-learn's bundled 8x8 digits (no download), split into corrupted domains.

The 1,797 images are shuffled once (by ``seed``) and split into a clean test set, a small clean
meta set, and disjoint pools for the training domains:

============== ===================================================================
``clean``       untouched images and labels
``label_noise`` a fraction ``label_noise`` of labels replaced by another class
``pixel_noise`` Gaussian noise of std ``pixel_noise`` added to the [0, 1] pixels
``permuted``    every image's pixels shuffled independently (no usable signal)
``imbalanced``  drawn with weight ``imbalance`` on classes 0 and 1 (about 70% of it)
============== ===================================================================

Every domain draws its own images, so a domain's content does not depend on which others are
in a run; the top-level override ``domains=[clean]`` trains on a subset (the clean-only oracle).
"""

from __future__ import annotations

import numpy as np
import torch

from bilevel.data.checks import check_counts, check_fractions, check_seed
from bilevel.data.columns import domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import classification_metrics
from bilevel.data.noisy_domains import flip_labels
from bilevel.errors import ConfigError, is_finite_number

__all__ = ["DIGITS_DOMAINS", "digits"]

DIGITS_DOMAINS = ("clean", "label_noise", "pixel_noise", "permuted", "imbalanced")


def digits(
    per_domain: int = 150,
    meta_size: int = 100,
    test_size: int = 400,
    label_noise: float = 0.5,
    pixel_noise: float = 1.0,
    imbalance: float = 0.8,
    seed: int = 0,
) -> DomainData:
    """Build the digits domains (see the module doc)."""
    from sklearn.datasets import load_digits

    check_counts(per_domain=(per_domain, 1), meta_size=(meta_size, 1), test_size=(test_size, 1))
    check_fractions(label_noise=(label_noise, "[0, 1)"), imbalance=(imbalance, "[0, 1]"))
    if not (is_finite_number(pixel_noise) and pixel_noise >= 0):  # -1 would act as 1, silently
        raise ConfigError("data.pixel_noise", f"must be a finite number >= 0, got {pixel_noise!r}")
    x_all, y_all = load_digits(return_X_y=True)
    need = test_size + meta_size + per_domain * len(DIGITS_DOMAINS)
    if need > len(y_all):
        raise ConfigError(
            "data",
            f"test_size + meta_size + 5 * per_domain = {test_size} + {meta_size} + 5 * "
            f"{per_domain} = {need} exceeds the {len(y_all)} images: lower data.per_domain, "
            "data.meta_size or data.test_size",
        )
    # The imbalanced domain is drawn last, from what the other domains left: classes 0 and 1
    # must still hold enough images for it.
    per_class_left = (len(y_all) - test_size - meta_size - 4 * per_domain) / 10
    if imbalance * per_domain > 2 * per_class_left * 0.9:
        raise ConfigError(
            "data.imbalance",
            f"{imbalance} * per_domain needs more images of classes 0 and 1 than the split "
            "leaves; lower data.imbalance or data.per_domain",
        )
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_all))
    x = torch.tensor(x_all[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y_all[order], dtype=torch.int64)
    test = slice(0, test_size)
    meta = slice(test_size, test_size + meta_size)
    pool = np.arange(test_size + meta_size, len(y))
    gen = torch.Generator().manual_seed(seed)

    def take_pool(n: int, weights: np.ndarray | None = None) -> np.ndarray:
        nonlocal pool
        p = None if weights is None else weights / weights.sum()
        chosen = rng.choice(len(pool), size=n, replace=False, p=p)
        picked = pool[chosen]
        pool = np.delete(pool, chosen)
        return picked

    parts = {}
    for name in DIGITS_DOMAINS:
        if name == "imbalanced":
            labels = y[pool].numpy()
            major = np.isin(labels, [0, 1])
            weights = np.where(major, imbalance / major.sum(), (1 - imbalance) / (~major).sum())
            idx = take_pool(per_domain, weights)
        else:
            idx = take_pool(per_domain)
        xi, yi = x[idx].clone(), y[idx].clone()
        if name == "label_noise":
            yi = flip_labels(yi, label_noise, 10, gen)
        elif name == "pixel_noise":
            xi = xi + pixel_noise * torch.randn(xi.shape, generator=gen)
        elif name == "permuted":
            perm = torch.argsort(torch.rand(xi.shape, generator=gen), dim=1)
            xi = torch.gather(xi, 1, perm)
        parts[name] = {"x": xi, "y": yi}

    return DomainData(
        names=list(DIGITS_DOMAINS),
        train=domain_columns([parts[name] for name in DIGITS_DOMAINS]),
        meta={"x": x[meta], "y": y[meta]},
        test={"x": x[test], "y": y[test]},
        evaluate=classification_metrics,
        model_kwargs={"in_dim": 64, "out_dim": 10},
    )
