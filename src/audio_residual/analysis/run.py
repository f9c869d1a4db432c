"""The whole analysis of one fold: statistics on its training folds, spectra, pattern PCA, ablation, figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from audio_residual.analysis import plots
from audio_residual.analysis.ablation import head_ablation
from audio_residual.analysis.patterns import PatternReservoir
from audio_residual.analysis.spectra import evr_curves, explained_variance_ratio, spectra_table
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.io import save_figure, write_csv, write_json
from audio_residual.layout import AnalysisLayout


@dataclass
class AnalysisResult:
    """What one fold's analysis produced: the fitted statistics, the tables and the figures (also on disk)."""

    stats: ResidualStatistics
    spectra: pd.DataFrame  # one row per unit and view (contribution PCA, attention-pattern PCA)
    ablation: pd.DataFrame  # one row per mean-ablated head
    figures: dict[str, Figure]  # shown inline by notebooks, saved as PNG beside the tables
    paths: dict[str, Path]


def _fit_statistics(
    ws, fold: int, train: np.ndarray, tokens_per_clip: int | None, batch_size: int, pattern_cap: int
) -> tuple[ResidualStatistics, PatternReservoir]:
    """Moments and attention-pattern reservoir of the training clips, from one forward over them.

    The moments and the reservoir ride the same hooks' pass; the metadata records which folds and which
    model and workspace the statistics come from, so a saved file says what it was fitted on.
    """
    bundle, features = ws.bundle, ws.features
    metadata = {
        "model_id": bundle.model_id,
        "dataset": ws.table.name,
        "fold": int(fold),
        "fit_on": "train",
        "train_folds": sorted({int(f) for f in ws.table.folds[train]}),
        "provenance": ws.provenance(),
    }
    reservoir = PatternReservoir(cap=pattern_cap)
    stats = ResidualStatistics.fit(
        bundle.model,
        features.input_features,
        train,
        batch_size=batch_size,
        tokens_per_clip=tokens_per_clip,
        autocast=bundle.autocast,
        device=bundle.device,
        is_longer=features.is_longer,
        metadata=metadata,
        extra_hooks=[("*.attn.hook_pattern", reservoir.hook)],
    )
    return stats, reservoir


def _figures(
    spectra: pd.DataFrame, stats: ResidualStatistics, reservoir: PatternReservoir, ablation: pd.DataFrame
) -> dict[str, Figure]:
    """Every figure of the analysis by file stem, built from the tables so notebooks can show them inline."""
    pattern_curves = {name: np.cumsum(explained_variance_ratio(v)) for name, v in reservoir.eigenvalues().items()}
    return {
        "id90_heads": plots.intrinsic_dimension_heatmap(spectra, "id90"),
        "id90_heads_pattern": plots.intrinsic_dimension_heatmap(spectra, "id90", view="pattern"),
        "participation_heads": plots.participation_heatmap(spectra),
        "participation_layers": plots.mean_participation_by_layer(spectra),
        "evr_heads": plots.evr_curves_plot(evr_curves(stats, "head"), "head contributions: cumulative EVR"),
        "evr_blocks": plots.evr_curves_plot(evr_curves(stats, "block"), "block attention outputs: cumulative EVR"),
        "evr_patterns": plots.evr_curves_plot(pattern_curves, "attention patterns: cumulative EVR"),
        "ablation": plots.ablation_heatmap(ablation),
    }


def _summary(
    stats: ResidualStatistics,
    test_clips: int,
    ablation: pd.DataFrame,
    pattern_cap: int,
    reservoir: PatternReservoir,
) -> dict:
    """summary.json: the statistics' metadata plus what the ablation and the pattern reservoir saw."""
    return {
        **stats.metadata,
        "test_clips": int(test_clips),
        "ablation_clips": int(ablation["clips"].iloc[0]) if len(ablation) else 0,
        "base_accuracy": float(ablation["base_accuracy"].iloc[0]) if len(ablation) else None,
        "pattern_cap": pattern_cap,
        "pattern_windows_seen": reservoir.seen,
    }


def run_analysis(
    ws,
    fold: int,
    out_dir: str | Path | AnalysisLayout,
    tokens_per_clip: int | None = None,
    batch_size: int = 16,
    ablation_stages: Sequence[int] | None = None,
    ablation_max_clips: int | None = None,
    pattern_cap: int = 512,
) -> AnalysisResult:
    """Fit statistics on fold `fold`'s TRAINING clips only, then write, under `out_dir`:

    stats_fold{K}.safetensors, heads.csv (one row per unit: contribution PCA of heads/blocks/layers and
    pattern PCA of heads, column `view`), ablation.csv (mean-ablated heads on the fold's test clips),
    summary.json and PNG figures.
    """
    out = AnalysisLayout.of(out_dir)
    split = ws.split(fold)
    if len(split.train) == 0:
        raise ValueError(f"fold {fold} has no training clips to fit statistics on")
    stats, reservoir = _fit_statistics(ws, fold, split.train, tokens_per_clip, batch_size, pattern_cap)
    paths = {"stats": stats.save(out.stats(fold))}

    spectra = pd.concat([spectra_table(stats), reservoir.table()], ignore_index=True)
    paths["heads"] = write_csv(out.heads, spectra)

    features = ws.features
    ablation = head_ablation(
        ws.classifier,
        features.input_features,
        ws.table.labels,
        split.test,
        stats,
        stages=ablation_stages,
        max_clips=ablation_max_clips,
        batch_size=batch_size,
        is_longer=features.is_longer,
    )
    paths["ablation"] = write_csv(out.ablation, ablation)

    figures = _figures(spectra, stats, reservoir, ablation)
    for name, fig in figures.items():
        paths[f"png_{name}"] = save_figure(fig, out.figure(name))
    summary = _summary(stats, len(split.test), ablation, pattern_cap, reservoir)
    paths["summary"] = write_json(out.summary, summary)
    return AnalysisResult(stats, spectra, ablation, figures, paths)
