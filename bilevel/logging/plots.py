"""Plots of a run: the weight trajectories (``weights.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_weights"]


def plot_weights(
    records: Sequence[dict[str, Any]], path: str | Path, title: str = "domain weights"
) -> Path | None:
    """Line plot of every domain's weight against the inner step; ``None`` without records."""
    rows = [r for r in records if isinstance(r.get("weights"), dict)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["weights"])
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.plot(steps, [float(r["weights"].get(name, float("nan"))) for r in rows], label=name)
    ax.set_xlabel("inner step")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncol=max(1, len(names) // 8))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
