"""PNG plots of scenario results (matplotlib, headless): CDFs and time series.

A scenario describes its plots as data (`Plot`), the CLI draws them; so runs in tests need
no matplotlib work and every plot has labelled axes with units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Plot:
    """One figure: `kind` "cdf" (series of values), "series" (series of (x, y) points drawn
    as steps: counts over time) or "line" ((x, y) points joined, with markers: a measure
    against a parameter)."""

    name: str  # file name without .png
    kind: str
    title: str
    xlabel: str  # with the unit, e.g. "completion time (s)"
    ylabel: str
    series: dict[str, Sequence[float] | Sequence[tuple[float, float]]] = field(
        default_factory=dict)
    logx: bool = False
    xticklabels: tuple[str, ...] = ()  # names for x = 0, 1, ... (categories)


def draw(plot: Plot, out: Path) -> Path:
    """Write `out/NAME.png` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for label, values in plot.series.items():
            if plot.kind == "cdf":
                xs = sorted(float(v) for v in values)  # type: ignore[arg-type]
                if not xs:
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
            elif plot.kind in ("series", "line"):
                pts = list(values)
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]  # type: ignore[index]
                if plot.kind == "line":
                    ax.plot(xs, ys, marker="o", label=label)
                else:
                    ax.step(xs, ys, where="post", label=label)
            else:
                raise ValueError(f"unknown plot kind {plot.kind!r}")
        if plot.kind == "cdf":
            ax.set_ylim(0, 1.02)
        if plot.logx:
            ax.set_xscale("log")
        if plot.xticklabels:
            ax.set_xticks(range(len(plot.xticklabels)), list(plot.xticklabels))
        ax.set_title(plot.title)
        ax.set_xlabel(plot.xlabel)
        ax.set_ylabel(plot.ylabel)
        ax.grid(True, alpha=0.3)
        if plot.series:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = out / f"{plot.name}.png"
        fig.savefig(path)
        return path
    finally:
        plt.close(fig)
