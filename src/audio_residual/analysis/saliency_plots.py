"""Figures of the saliency analysis: log-mel with saliency overlays, deletion/insertion curves, map change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


HZ_TICKS = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def shared_bounds(maps: Mapping[str, np.ndarray], units: Mapping[str, str]) -> dict[str, float]:
    """One colour bound per unit over the maps of one clip: the largest of their 99th percentiles of |value|,
    so the strongest map of a unit sets the scale and a map that sums to 1 % of it looks 1 % as strong."""
    bounds: dict[str, float] = {}
    for method, saliency in maps.items():
        unit = units.get(method, method)
        bounds[unit] = max(bounds.get(unit, 0.0), float(np.quantile(np.abs(saliency), 0.99)))
    return {unit: bound or 1.0 for unit, bound in bounds.items()}


def _hz_axis(ax, mel_hz: np.ndarray) -> None:
    """Label a mel-bin axis (bin i spans [i, i + 1]) in Hz at the bins' centre frequencies."""
    ticks = [hz for hz in HZ_TICKS if mel_hz[0] <= hz <= mel_hz[-1]]
    positions = np.interp(ticks, mel_hz, np.arange(len(mel_hz))) + 0.5
    ax.set_yticks(positions, [f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}" for hz in ticks])
    ax.set_ylabel("Hz (mel)", fontsize=8)


def saliency_figure(
    log_mel_db: np.ndarray,
    maps: Mapping[str, np.ndarray],
    hop_seconds: float,
    mel_hz: np.ndarray,
    title: str = "",
    units: Mapping[str, str] | None = None,
    copies_at: Sequence[float] = (),
) -> Figure:
    """One clip: its log-mel, then one panel per method with the saliency over the greyed log-mel.

    Maps are signed: red where a cell raises the score, blue where it lowers it. Methods in one unit
    (`units[method]`, e.g. "logit per cell" for IG and gradient × input) share one colour scale
    (`shared_bounds`), named on each colour bar. `copies_at`: times (s) where a repeat-padded clip starts
    over, drawn as dashed lines.
    """
    units = units or {}
    bounds = shared_bounds(maps, units)
    panels = 1 + len(maps)
    fig = _figure(8.0, 1.8 * panels + 0.4)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    extent = (0.0, log_mel_db.shape[0] * hop_seconds, 0, log_mel_db.shape[1])
    shown = dict(origin="lower", aspect="auto", extent=extent, interpolation="nearest")
    image = axes[0].imshow(log_mel_db.T, cmap="magma", **shown)
    fig.colorbar(image, ax=axes[0], label="dB")
    axes[0].set_title(title or "log-mel", fontsize=8)
    sharing = {unit: [m for m in maps if units.get(m, m) == unit] for unit in bounds}
    for ax, (method, saliency) in zip(axes[1:], maps.items(), strict=True):
        unit = units.get(method, method)
        bound = bounds[unit]
        ax.imshow(log_mel_db.T, cmap="gray", alpha=0.6, **shown)
        alpha = np.clip(np.abs(saliency.T) / bound, 0.0, 1.0)
        image = ax.imshow(saliency.T, cmap="coolwarm", vmin=-bound, vmax=bound, alpha=alpha, **shown)
        others = [m for m in sharing[unit] if m != method]
        label = unit + (f"\n(scale shared with {', '.join(others)})" if others else "")
        fig.colorbar(image, ax=ax).set_label(label, fontsize=7)
        ax.set_title(method, fontsize=9)
    for ax in axes:
        _hz_axis(ax, mel_hz)
        for start in copies_at:
            ax.axvline(start, color="white", linestyle="--", linewidth=0.8)
    axes[-1].set_xlabel("time (s)")
    return fig


def curves_figure(
    means: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    methods: Sequence[str],
    score_label: str,
    clips: tuple[int, int],
) -> Figure:
    """Mean deletion and insertion curves of every method, random order and randomised-model maps: raw scores
    over all clips (top), normalised (s − s(b)) / (s(x) − s(b)) over the `clips[1]` of `clips[0]` clips
    whose s(x) − s(b) is large enough (bottom)."""
    fig = _figure(10.0, 6.4)
    colours = {method: f"C{i}" for i, method in enumerate(methods)}  # a method and its randomised twin share one
    grid = fig.subplots(2, 2, sharex=True)
    labels = (f"{score_label}\n(mean over {clips[0]} clips)",
              f"(s − s(b)) / (s(x) − s(b))\n(mean over {clips[1]} clips)")
    for row, label in enumerate(labels):
        for ax, mode in zip(grid[row], ("deletion", "insertion"), strict=True):
            for name, per_mode in means.items():
                curve = per_mode[mode][row]
                method = name.removeprefix("randomised:")
                style = {"color": colours.get(method, "grey"), "linestyle": ":" if name != method else "-"}
                if name == "random":
                    style = {"color": "black", "linestyle": "--"}
                ax.plot(np.linspace(0, 1, len(curve)), curve, label=name, **style)
            ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(f"{mode}: {'lower' if mode == 'deletion' else 'higher'} is more faithful", fontsize=10)
            else:
                ax.set_xlabel(f"fraction of cells {'replaced by the baseline' if mode == 'deletion' else 'restored'}")
    grid[0, 1].legend(fontsize=7, loc="best")
    return fig


def change_figure(regions: pd.DataFrame, clips: pd.DataFrame) -> Figure:
    """Before vs after adaptation: where the saliency change concentrates, and map similarity per clip."""
    fig = _figure(10.0, 3.2)
    left, right = fig.subplots(1, 2)
    positions = np.arange(len(regions))
    left.bar(positions - 0.2, regions["change_share"], width=0.4, label="share of |change|")
    left.bar(positions + 0.2, regions["area_share"], width=0.4, label="share of the spectrogram")
    left.set_xticks(positions, regions["region"], rotation=30, fontsize=8)
    left.legend(fontsize=7)
    left.set_title("where the saliency changed", fontsize=10)
    right.bar(clips["clip"].astype(str), clips["rank_corr"])
    right.set_ylim(-1, 1)
    right.set_xlabel("clip")
    right.set_ylabel("Spearman ρ (before, after)")
    right.set_title("map similarity per clip", fontsize=10)
    return fig
