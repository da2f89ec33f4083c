"""Plots of a run: ``weights.png``, the weight trajectories from the starting point, and the
meta loss beneath them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel.files import write_atomic

__all__ = ["plot_weights"]


def _legend(name: str, info: dict[str, Any] | None) -> str:
    """``name`` plus what the data builder knows about the domain (e.g. its label noise)."""
    extras = []
    for key, values in (info or {}).items():
        if isinstance(values, dict) and name in values:
            extras.append(f"{key.replace('_', ' ')} {values[name]}")
    return f"{name} ({', '.join(extras)})" if extras else name


def plot_weights(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "domain weights",
    info: dict[str, Any] | None = None,
) -> Path | None:
    """Each domain's weight against the inner step (from step 0, the initial weights) and, in a
    second panel, the meta loss; ``None`` without records."""
    rows = [r for r in records if isinstance(r.get("weights"), dict)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["weights"])
    steps = [r["step"] for r in rows]
    meta = [(r["step"], r["meta_loss"]) for r in rows if isinstance(r.get("meta_loss"), float)]
    fig, (ax, bx) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    for name in names:
        values = [float(r["weights"].get(name, float("nan"))) for r in rows]
        ax.plot(steps, values, label=_legend(name, info))
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncol=max(1, len(names) // 8))
    if meta:
        bx.plot([m[0] for m in meta], [m[1] for m in meta], color="black", lw=1.2)
    bx.set_ylabel("meta loss")
    bx.set_xlabel("inner step")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
