"""Small plotting helpers for the suites (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(path: Path, title: str, labels: Sequence[str], values: Sequence[float], unit: str,
         highlight_prefix: str = "aem") -> None:
    """A horizontal bar chart, aem's bars highlighted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(labels)))
    colors = ["#d62728" if lab.startswith(highlight_prefix) else "#7f7f7f" for lab in labels]
    ax.barh(list(labels), list(values), color=colors)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cdf(path: Path, title: str, series: Mapping[str, Sequence[float]], unit: str, log: bool = True) -> None:
    """Cumulative distributions of several sample sets."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, samples in series.items():
        data = sorted(samples)
        if not data:
            continue
        ys = [(i + 1) / len(data) for i in range(len(data))]
        ax.plot(data, ys, label=name, linewidth=2.2 if name.startswith("aem") else 1.2)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lines(path: Path, title: str, xs: Sequence[float], series: Mapping[str, Sequence[float | None]],
          xlabel: str, ylabel: str, logy: bool = False) -> None:
    """One line per series over shared x values (None: no point)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linewidth=2.2 if name.startswith("aem") else 1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
