"""PNG figures for the command line (matplotlib, Agg back-end: no display needed).

Each function writes one PNG atomically and returns its path. matplotlib is imported lazily,
so the rest of the package works without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import atomic_write

__all__ = [
    "plot_compression_curve",
    "plot_dh_histogram",
    "plot_generations",
    "plot_learning_curve",
    "plot_screening_timeline",
]


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_learning_curve(
    path: str | os.PathLike,
    sizes: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    fit: dict | None = None,
    title: str = "",
) -> Path:
    """Entropy learning curve ``H(N)`` with error bars, the fit ``a - b N^-c`` and ``H_inf``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(sizes, mean, yerr=std, fmt="o", ms=4, capsize=2, label="H(N), random subsets")
    ax.plot(sizes, np.log(sizes), ":", color="grey", label="log N (upper bound)")
    if fit is not None:
        grid = np.geomspace(sizes.min(), sizes.max() * 10, 200)
        ax.plot(grid, fit["a"] - fit["b"] * grid ** (-fit["c"]), "-", label="fit a - b N^-c")
        ax.axhline(fit["h_inf"], ls="--", color="k", lw=1, label=f"H_inf = {fit['h_inf']:.3f}")
    ax.set_xscale("log")
    ax.set_ylim(0, max(float(np.max(mean)) * 1.3, fit["h_inf"] * 1.1 if fit else 0) + 0.1)
    ax.set_xlabel("environments N")
    ax.set_ylabel("entropy H (nats)")
    ax.set_title(title or "entropy learning curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_dh_histogram(
    path: str | os.PathLike, dh: np.ndarray, threshold: float = 0.0, title: str = ""
) -> Path:
    """Histogram of per-environment dH with the novelty threshold marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.hist(dh, bins=80, color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:g}")
    novel = float(np.mean(dh > threshold)) if dh.size else 0.0
    ax.set_xlabel("dH (nats)")
    ax.set_ylabel("environments")
    ax.set_yscale("log")
    ax.set_title(title or f"dH vs reference: {100 * novel:.1f}% novel")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_screening_timeline(
    path: str | os.PathLike,
    table: dict[str, np.ndarray],
    x: np.ndarray | None = None,
    xlabel: str = "frame",
    title: str = "",
) -> Path:
    """Per-frame dH (max, mean), novel fraction and largest covered cluster over a trajectory."""
    plt = _pyplot()
    t = table["frame"] if x is None else x
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 7), sharex=True)
    axes[0].plot(t, table["dH_max"], label="max dH")
    axes[0].plot(t, table["dH_mean"], label="mean dH")
    axes[0].axhline(0.0, color="k", lw=0.8, ls=":")
    axes[0].set_ylabel("dH (nats)")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, 100 * table["novel_fraction"], color="tab:red")
    axes[1].set_ylabel("novel atoms (%)")
    axes[1].set_ylim(-2, 102)
    axes[2].plot(t, table["largest_cluster"], color="tab:green", label="largest cluster")
    axes[2].plot(t, table["n_atoms"], color="grey", ls=":", label="atoms")
    axes[2].set_ylabel("atoms")
    axes[2].set_xlabel(xlabel)
    axes[2].legend(fontsize=8)
    axes[0].set_title(title or "screening timeline")
    fig.tight_layout()
    return _save(fig, path)


def plot_compression_curve(
    path: str | os.PathLike,
    curve: dict[str, list],
    n_total: int,
    title: str = "",
) -> Path:
    """Entropy and diversity of the selection, and its overlap with the dataset, vs its size."""
    plt = _pyplot()
    m = np.asarray(curve["n_structures"])
    fig, axes = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True)
    axes[0].plot(m, curve["entropy"], "-", label="entropy H")
    axes[0].plot(m, curve["diversity"], "--", label="diversity D")
    axes[0].plot(
        m,
        np.log(np.asarray(curve["n_environments"])),
        ":",
        color="grey",
        label="log n (upper bound)",
    )
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=8)
    axes[1].plot(m, 100 * np.asarray(curve["overlap"]), color="tab:green")
    axes[1].set_ylabel("dataset covered (%)")
    axes[1].set_ylim(-2, 102)
    axes[1].set_xlabel(f"selected structures (of {n_total})")
    axes[0].set_title(title or "compression curve")
    fig.tight_layout()
    return _save(fig, path)


def plot_generations(path: str | os.PathLike, rows: list[dict], title: str = "") -> Path:
    """Cumulative entropy/diversity and per-generation novelty of an active-learning loop."""
    plt = _pyplot()
    g = np.arange(len(rows))
    labels = [str(r["generation"]) for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True)
    axes[0].plot(g, [r["entropy"] for r in rows], "o-", label="entropy H (cumulative)")
    axes[0].plot(g, [r["diversity"] for r in rows], "s--", label="diversity D (cumulative)")
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=8)
    nov = [np.nan if r["novelty"] is None else 100 * r["novelty"] for r in rows]
    axes[1].bar(g, nov, color="tab:red")
    axes[1].set_ylabel("novel vs earlier (%)")
    step = max(1, len(rows) // 12)  # at most ~12 labelled ticks
    axes[1].set_xticks(g[::step], labels[::step], rotation=30, ha="right")
    axes[1].set_xlabel("generation")
    axes[0].set_title(title or "active-learning generations")
    fig.tight_layout()
    return _save(fig, path)
