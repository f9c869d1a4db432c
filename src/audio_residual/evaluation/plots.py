"""Figures of the comparison: accuracy per fold, per-class deltas vs zero-shot, summed confusion matrices,
accuracy vs trainable parameters, few-shot curves and the zero-shot transfer heatmap.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so importing this module neither
picks a backend nor leaks open figures; Jupyter still displays the returned objects.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


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


def _by_regime(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, sample std (0 for one value) and mean trainable parameters per (method, shots) over folds × seeds.

    Full-data rows have no `shots` (column absent or NaN); they come back with shots NaN.
    """
    frame = results.assign(shots=results["shots"] if "shots" in results else np.nan)
    grouped = frame.groupby(["method", "shots"], dropna=False, sort=False)
    summary = grouped.agg(mean=(metric, "mean"), std=(metric, "std"), params=("trainable_params", "mean"))
    return summary.fillna({"std": 0.0}).reset_index()


def _method_colors(methods) -> dict[str, str]:
    return {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys(methods))}


def accuracy_vs_parameters(results: pd.DataFrame, metric: str = "accuracy") -> Figure:
    """The headline: accuracy against trainable parameters (log x), one panel for full data and one per k.

    One point per method with its spread (± sample std over folds × seeds); methods that train nothing
    (zero-shot) cannot sit on a log axis and are drawn as dashed horizontal lines instead, in every
    panel: without k-shot rows of their own, their full-data level (the test folds are the same).
    """
    summary = _by_regime(results, metric)
    regimes = ([np.nan] if summary["shots"].isna().any() else []) + sorted(summary["shots"].dropna().unique())
    colors = _method_colors(summary["method"])
    fig = Figure(figsize=(3.2 * len(regimes) + 1.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(regimes), sharey=True, squeeze=False)[0]
    full = summary[summary["shots"].isna()]
    for ax, shots in zip(axes, regimes, strict=True):
        rows = full if np.isnan(shots) else summary[summary["shots"] == shots]
        untrained = full[(full["params"] == 0) & ~full["method"].isin(rows["method"])]
        for row in pd.concat([untrained, rows]).itertuples():
            if row.params > 0:
                ax.errorbar(row.params, row.mean, yerr=row.std, fmt="o", capsize=3, color=colors[row.method],
                            label=row.method)  # fmt: skip
            else:
                ax.axhline(row.mean, linestyle="--", color=colors[row.method], label=f"{row.method} (0 params)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide when the range is under a decade
        ax.margins(x=0.15)
        ax.set(title="full data" if np.isnan(shots) else f"{int(shots)}-shot", xlabel="trainable parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"{metric} (mean ± std)")
    handles = {}
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return fig


def metrics_vs_parameters(results: pd.DataFrame, metrics: dict[str, str | None], title: str = "") -> Figure:
    """Several metrics against trainable parameters (log x), one panel each (e.g. R@1 of both retrieval
    directions): trained methods as points, methods that train nothing as dashed lines; `metrics` maps each
    metric to the column of its random baseline (a dotted line), or None."""
    colors = _method_colors(results["method"])
    fig = Figure(figsize=(3.4 * len(metrics) + 1.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    summary = results.groupby("method", sort=False).mean(numeric_only=True).reset_index()
    for ax, (metric, random) in zip(axes, metrics.items(), strict=True):
        for row in summary.itertuples():
            value, params = getattr(row, metric), row.trainable_params
            if params > 0:
                ax.plot(params, value, "o", color=colors[row.method], label=row.method)
                ax.annotate(row.method, (params, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
            else:
                ax.axhline(value, linestyle="--", color=colors[row.method], label=f"{row.method} (0 params)")
        if random is not None:
            ax.axhline(summary[random].iloc[0], linestyle=":", color="grey", label="random ranking")
        if (summary["trainable_params"] > 0).any():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=metric, xlabel="trainable parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test value")
    handles = {}
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def few_shot_curves(results: pd.DataFrame, metric: str = "accuracy") -> Figure:
    """Accuracy against k (log2 x), one line per method with ± std bars; full-data results as dotted lines."""
    summary = _by_regime(results, metric)
    colors = _method_colors(summary["method"])
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    few = summary.dropna(subset=["shots"]).sort_values("shots", kind="stable")
    for method, rows in few.groupby("method", sort=False):
        ax.errorbar(rows["shots"], rows["mean"], yerr=rows["std"], marker="o", capsize=3, color=colors[method],
                    label=method)  # fmt: skip
    for row in summary[summary["shots"].isna()].itertuples():
        ax.axhline(row.mean, linestyle=":", color=colors[row.method], label=f"{row.method} (full data)")
    ks = sorted(few["shots"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(int(k)) for k in ks])
    ax.set(xlabel="training clips per class (k)", ylabel=f"{metric} (mean ± std)", title=f"few-shot {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def transfer_heatmap(matrix: pd.DataFrame, title: str = "zero-shot accuracy after adapting on the source") -> Figure:
    """Sources (rows) × targets (columns) from `transfer.transfer_matrix`, each cell annotated; blank = A = A."""
    values = matrix.to_numpy(dtype=float)
    fig = Figure(figsize=(1.2 * values.shape[1] + 2.5, 0.6 * values.shape[0] + 1.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
    ax.set(xlabel="evaluated on (target)", ylabel="adapted on (source)", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    return fig
