"""Pictures of learned λ: which principal components each unit amplified (λ > 1) or suppressed (λ < 1).

Bare `Figure`s (no pyplot state): nothing leaks or pops up; notebooks display them inline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure


def lambda_heatmap(table: pd.DataFrame, max_components: int = 64, title: str = "ResiDual λ per component"):
    """Units as rows, principal components (by explained variance) as columns, colour centred at λ = 1."""
    wide = table.pivot_table(index="unit", columns="component", values="lambda", sort=False)
    wide = wide.iloc[:, :max_components]
    values = wide.to_numpy()
    spread = max(float(np.nanmax(np.abs(values - 1))), 1e-3)
    fig = Figure(figsize=(min(2 + 0.18 * wide.shape[1], 16), min(1.5 + 0.22 * len(wide), 18)))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 1 - spread, 1 + spread))
    ax.set_yticks(range(len(wide)), [u.replace("layers.", "L").replace(".blocks.", ".B") for u in wide.index], fontsize=6)
    ax.set_xlabel("principal component (descending explained variance)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="λ (1 = unchanged)")
    fig.tight_layout()
    return fig


def lambda_profile(table: pd.DataFrame, title: str = "λ by component rank"):
    """λ against component rank, one faint line per unit plus the median: a compact summary."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for _, unit in table.groupby("unit", sort=False):
        ax.plot(unit["component"], unit["lambda"], color="tab:blue", alpha=0.15, linewidth=0.8)
    median = table.groupby("component")["lambda"].median()
    ax.plot(median.index, median.to_numpy(), color="black", linewidth=2, label="median over units")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("principal component")
    ax.set_ylabel("λ")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
