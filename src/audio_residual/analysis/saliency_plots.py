"""Figures of the saliency analysis: log-mel with saliency overlays, deletion/insertion curves, map change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _overlay(saliency: np.ndarray, signed: bool) -> np.ndarray:
    """A map scaled to [0, 1] (or [−1, 1] if signed) by its 99th percentile of |value|, for display only."""
    bound = float(np.quantile(np.abs(saliency), 0.99)) or 1.0
    return np.clip(saliency / bound, -1.0 if signed else 0.0, 1.0)


def saliency_figure(
    log_mel_db: np.ndarray,
    maps: Mapping[str, np.ndarray],
    signed: Mapping[str, bool],
    hop_seconds: float,
    title: str = "",
) -> Figure:
    """One clip: its log-mel, then one panel per method with the saliency over the greyed log-mel.

    Signed maps (IG, gradient × input) are red where a cell raises the score, blue where it lowers it.
    """
    panels = 1 + len(maps)
    fig = _figure(8.0, 1.7 * panels)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    extent = (0.0, log_mel_db.shape[0] * hop_seconds, 0, log_mel_db.shape[1])
    shown = dict(origin="lower", aspect="auto", extent=extent, interpolation="nearest")
    image = axes[0].imshow(log_mel_db.T, cmap="magma", **shown)
    fig.colorbar(image, ax=axes[0], label="dB")
    axes[0].set_title(title or "log-mel", fontsize=9)
    for ax, (method, saliency) in zip(axes[1:], maps.items(), strict=True):
        ax.imshow(log_mel_db.T, cmap="gray", alpha=0.6, **shown)
        is_signed = signed.get(method, True)
        overlay = _overlay(saliency, is_signed).T
        alpha = np.clip(np.abs(overlay), 0.0, 1.0)
        image = ax.imshow(overlay, cmap="coolwarm" if is_signed else "hot", vmin=-1 if is_signed else 0, vmax=1,
                          alpha=alpha, **shown)
        fig.colorbar(image, ax=ax, label="relative")
        ax.set_title(method, fontsize=9)
    for ax in axes:
        ax.set_ylabel("mel bin")
    axes[-1].set_xlabel("time (s)")
    return fig


def curves_figure(curves: Mapping[str, Mapping[str, np.ndarray]], methods: Sequence[str]) -> Figure:
    """Mean deletion and insertion curves of every method, random order and randomised-model maps."""
    fig = _figure(10.0, 3.6)
    colours = {method: f"C{i}" for i, method in enumerate(methods)}  # a method and its randomised twin share one
    for ax, mode in zip(fig.subplots(1, 2), ("deletion", "insertion"), strict=True):
        for name, per_mode in curves.items():
            curve = per_mode[mode]
            fractions = np.linspace(0, 1, len(curve))
            method = name.removeprefix("randomised:")
            style = {"color": colours.get(method, "grey"), "linestyle": ":" if name != method else "-"}
            if name == "random":
                style = {"color": "black", "linestyle": "--"}
            ax.plot(fractions, curve, label=name, **style)
        ax.set_title(f"{mode} (mean over clips)", fontsize=10)
        ax.set_xlabel(f"fraction of cells {'removed' if mode == 'deletion' else 'restored'}")
        ax.set_ylabel("score")
    fig.axes[1].legend(fontsize=7, loc="best")
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
