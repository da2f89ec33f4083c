"""Plots of a run: ``weights.png``, the weight trajectories from the starting point, and the
meta loss beneath them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel.files import write_atomic

__all__ = ["plot_weights"]


#: up to this many domains the legend sits inside the axes; beyond, beside them
INSIDE = 8
#: beyond this many domains only the NAMED largest final weights get a colour and a legend
#: entry (the rest are grey lines): 40 entries in ten repeated colours told nothing apart
NAMED = 12


def _named(series: dict[str, list[float]]) -> list[str]:
    """The domains that get a colour and a legend entry: all of them up to :data:`NAMED`,
    else the :data:`NAMED` with the largest final (last finite) weight, largest first."""
    if len(series) <= NAMED:
        return list(series)

    def final(name: str) -> float:
        finite = [v for v in series[name] if v == v]
        return finite[-1] if finite else float("-inf")

    return sorted(series, key=final, reverse=True)[:NAMED]


def _legend(name: str, info: dict[str, Any] | None) -> str:
    """``name`` plus what the data builder knows about the domain (e.g. its label noise)."""
    extras = []
    for key, values in (info or {}).items():
        if isinstance(values, dict) and name in values:
            extras.append(f"{key.replace('_', ' ')} {values[name]}")
    return f"{name} ({', '.join(extras)})" if extras else name


def _series(rows: Sequence[dict[str, Any]], key: str, names: list[str]) -> tuple[list, dict]:
    """Steps and per-domain values of the records that hold ``key`` (a ``{domain: value}``)."""
    held = [r for r in rows if isinstance(r.get(key), dict) and r[key]]
    steps = [r["step"] for r in held]
    return steps, {n: [float(r[key].get(n, float("nan"))) for r in held] for n in names}


def plot_weights(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "domain weights",
    info: dict[str, Any] | None = None,
    ylabel: str = "weight",
) -> Path | None:
    """Each domain's weight against the inner step (from step 0, the initial weights), then,
    where the records hold them, each domain's share of the tokens trained on so far (the
    effective mixture of a corpus on disk) and its training loss, and the meta loss; ``None``
    without records. ``ylabel`` names what the records' ``weights`` are (a meta-weight net logs
    each domain's mean per-example weight)."""
    rows = [r for r in records if isinstance(r.get("weights"), dict)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["weights"])
    steps = [r["step"] for r in rows]
    meta = [(r["step"], r["meta_loss"]) for r in rows if isinstance(r.get("meta_loss"), float)]
    series = {n: [float(r["weights"].get(n, float("nan"))) for r in rows] for n in names}
    named = _named(series)
    panels = [("weights", ylabel, steps, series)]
    for key, label in (("mixture", "share of tokens seen"), ("domain_loss", "training loss")):
        at, values = _series(records, key, names)
        if at:
            panels.append((key, label, at, values))
    wide = len(names) > INSIDE  # the legend goes beside the axes, not over the lines
    heights = [3] + [1.6] * (len(panels) - 1) + [1.4]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(9.5 if wide else 7, 3.0 + 1.25 * len(heights)),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
    )
    colors = plt.get_cmap("tab10" if len(named) <= 10 else "tab20").colors
    for ax, (_key, label, at, values) in zip(axes, panels, strict=False):
        for name in names:  # the unnamed first and thin, so that the named lines stay on top
            if name not in named:
                ax.plot(at, values[name], color="0.75", lw=0.8)
        for i, name in enumerate(named):
            ax.plot(at, values[name], color=colors[i % len(colors)], label=_legend(name, info))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = axes[0]
    ax.set_title(title)
    if not wide:
        ax.legend(loc="best", fontsize="small")
    else:
        heading = (
            None
            if len(named) == len(names)
            else f"the {len(named)} largest final weights of {len(names)} (others grey)"
        )
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="x-small",
            title=heading,
            title_fontsize="x-small",
        )
    bx = axes[-1]
    if meta:
        bx.plot([m[0] for m in meta], [m[1] for m in meta], color="black", lw=1.2)
    bx.set_ylabel("meta loss")
    bx.set_xlabel("inner step")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)
