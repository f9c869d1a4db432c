"""Figures of the comparison: accuracy per fold, per-class deltas vs zero-shot, summed confusion matrices.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so importing this module neither
picks a backend nor leaks open figures; Jupyter still displays the returned objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from audio_residual.io import atomic_path


def save(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write the figure as PNG atomically (a crash never leaves a truncated image)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def fold_accuracy(results: pd.DataFrame, metric: str = "accuracy") -> Figure:
    """One line with points per method across folds: shows whether a gain is consistent or one lucky fold."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for method in dict.fromkeys(results["method"]):
        rows = results[results["method"] == method].sort_values("fold")
        ax.plot(rows["fold"], rows[metric], marker="o", label=method)
    ax.set_xticks(sorted(results["fold"].unique()))
    ax.set(xlabel="test fold", ylabel=metric, title=f"{metric} per fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def class_deltas(deltas: pd.DataFrame, method: str, baseline: str = "zeroshot") -> Figure:
    """Sorted horizontal bars of per-class accuracy change vs the baseline for one method (from `per_class_deltas`)."""
    rows = deltas[deltas["method"] == method].sort_values("delta")
    fig = Figure(figsize=(6, max(3.0, 0.18 * len(rows) + 1)), layout="constrained")
    ax = fig.add_subplot()
    colors = np.where(rows["delta"] >= 0, "tab:green", "tab:red")
    ax.barh(rows["class_name"].astype(str), rows["delta"], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set(xlabel=f"accuracy − {baseline} accuracy", title=f"{method}: per-class change vs {baseline}")
    return fig


def confusion_heatmap(
    confusion: np.ndarray, class_names=None, title: str = "confusion (summed over folds)"
) -> Figure:
    """Row-normalised heatmap (true class per row) of a confusion matrix, e.g. summed over folds."""
    confusion = np.asarray(confusion, dtype=float)
    totals = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
    n = len(confusion)
    size = max(4.0, 0.16 * n + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90, fontsize=6 if n > 20 else 8)
    ax.set_yticks(range(n), names, fontsize=6 if n > 20 else 8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return fig
