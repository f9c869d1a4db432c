"""Analysis of CLAP's residual units: moments and PCA, spectra, attention-pattern PCA, head ablation."""

from audio_residual.analysis.ablation import head_ablation, head_mean, mean_ablated, select_clips
from audio_residual.analysis.patterns import PatternReservoir, collect_patterns, gram_eigenvalues
from audio_residual.analysis.run import AnalysisResult, run_analysis
from audio_residual.analysis.spectra import (
    ID_THRESHOLDS,
    TABLE_COLUMNS,
    evr_curves,
    explained_variance_ratio,
    intrinsic_dimension,
    parse_unit,
    participation_ratio,
    spectra_table,
    spectrum_summary,
)
from audio_residual.analysis.stats import (
    Moments,
    PCABasis,
    ResidualStatistics,
    StreamingMoments,
    pca_from_moments,
)

__all__ = [
    "ID_THRESHOLDS",
    "TABLE_COLUMNS",
    "Moments",
    "PCABasis",
    "PatternReservoir",
    "ResidualStatistics",
    "StreamingMoments",
    "collect_patterns",
    "evr_curves",
    "explained_variance_ratio",
    "gram_eigenvalues",
    "head_ablation",
    "head_mean",
    "intrinsic_dimension",
    "mean_ablated",
    "parse_unit",
    "participation_ratio",
    "pca_from_moments",
    "AnalysisResult",
    "run_analysis",
    "select_clips",
    "spectra_table",
    "spectrum_summary",
]
