"""Figures of the analysis: per-head heatmaps, per-layer summaries, EVR curves. Each returns a Figure.

No backend is chosen here, so notebooks keep inline plots; headless callers (CLI, benchmarks) call
`matplotlib.use("Agg")` themselves before plotting.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from audio_residual.names import Unit


def _figure(width: float, height: float) -> Figure:
    # A bare Figure (not pyplot) is never registered with a GUI manager: no leaks in long loops.
    return Figure(figsize=(width, height), layout="constrained")


def head_grid(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """(stage, block) × head matrix of `value`; NaN where a block has fewer heads than the widest one."""
    heads = frame.dropna(subset=["head"]).astype({"stage": int, "block": int, "head": int})
    grid = heads.pivot_table(index=["stage", "block"], columns="head", values=value, aggfunc="mean")
    return grid.sort_index()


def head_heatmap(frame: pd.DataFrame, value: str, title: str, cmap: str = "viridis", centred: bool = False) -> Figure:
    """Heatmap of a per-head column: rows are blocks (s{stage}.b{block}), columns are head indices."""
    grid = head_grid(frame, value)
    fig = _figure(max(6.0, 0.22 * grid.shape[1] + 2.5), max(2.5, 0.35 * grid.shape[0] + 1.2))
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    limits = {}
    if centred:
        bound = float(np.nanmax(np.abs(grid.to_numpy(dtype=float)))) if data.count() else 1.0
        limits = {"vmin": -bound or -1.0, "vmax": bound or 1.0}
    image = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    ax.set_yticks(range(grid.shape[0]), [f"s{s}.b{b}" for s, b in grid.index])
    step = max(1, grid.shape[1] // 16)
    ax.set_xticks(range(0, grid.shape[1], step), [str(h) for h in grid.columns[::step]])
    ax.set_xlabel("head")
    ax.set_ylabel("stage.block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=value)
    return fig


def intrinsic_dimension_heatmap(table: pd.DataFrame, column: str = "id90", view: str = "contribution") -> Figure:
    heads = table[(table["granularity"] == "head") & (table["view"] == view)]
    return head_heatmap(heads, column, f"{column} per head ({view} PCA)")


def participation_heatmap(table: pd.DataFrame, view: str = "contribution") -> Figure:
    heads = table[(table["granularity"] == "head") & (table["view"] == view)]
    return head_heatmap(heads, "participation_ratio", f"participation ratio per head ({view} PCA)", cmap="magma")


def mean_participation_by_layer(table: pd.DataFrame) -> Figure:
    """Mean head participation ratio per stage, one bar group per view (contribution vs pattern)."""
    heads = table[table["granularity"] == "head"]
    means = heads.groupby(["stage", "view"])["participation_ratio"].mean().unstack("view")
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, means.shape[1])
    for i, view in enumerate(means.columns):
        ax.bar(np.arange(len(means)) + i * width, means[view].to_numpy(), width, label=view)
    ax.set_xticks(np.arange(len(means)) + width * (means.shape[1] - 1) / 2, [f"stage {s}" for s in means.index])
    ax.set_ylabel("mean participation ratio of heads")
    ax.set_title("effective dimension per layer")
    ax.legend()
    return fig


def evr_curves_plot(curves: Mapping[str, np.ndarray], title: str = "cumulative explained variance") -> Figure:
    """One cumulative-EVR curve per unit, coloured by stage, with the 90/95/99 % levels marked."""
    from matplotlib import colormaps

    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    stages = sorted({Unit.parse(name).stage for name in curves})
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(1, len(stages))))
    labelled = set()
    for name, cumulative in curves.items():
        stage = Unit.parse(name).stage
        label = None if stage in labelled else f"stage {stage}"
        labelled.add(stage)
        ax.plot(np.arange(1, len(cumulative) + 1), cumulative, color=colours[stages.index(stage)], alpha=0.6, lw=1, label=label)
    for level in (0.9, 0.95, 0.99):
        ax.axhline(level, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative EVR")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend()
    return fig


def ablation_heatmap(ablation: pd.DataFrame, value: str = "delta") -> Figure:
    """Δ zero-shot accuracy per mean-ablated head (red = accuracy lost)."""
    return head_heatmap(ablation, value, f"mean ablation: {value} per head", cmap="RdBu", centred=True)
